//! The lowered graph IR: what one architecture computes for one concrete
//! `config.json`. Every attribute here is a concrete number; symbolic
//! expressions were evaluated during lowering.
//!
//! Activations are 2-D `[tokens, width]` row-major tensors. Head-structured
//! ops (`rope`, per-head `rms_norm`, `attention`) view the width as
//! `heads × head_dim`.

use std::fmt;

/// Every op kind the spec language knows. Drivers report which they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Embedding,
    Linear,
    RmsNorm,
    LayerNorm,
    Rope,
    Attention,
    Add,
    Mul,
    Scale,
    Glu,
    Activation,
    Softcap,
    Split,
    Concat,
    Mix,
    Rms,
    GaussianTopk,
    Moe,
    GatedDeltaNet,
    Mamba2,
    MlaAttention,
}

impl OpKind {
    pub const ALL: [OpKind; 21] = [
        OpKind::Embedding,
        OpKind::Linear,
        OpKind::RmsNorm,
        OpKind::LayerNorm,
        OpKind::Rope,
        OpKind::Attention,
        OpKind::Add,
        OpKind::Mul,
        OpKind::Scale,
        OpKind::Glu,
        OpKind::Activation,
        OpKind::Softcap,
        OpKind::Split,
        OpKind::Concat,
        OpKind::Mix,
        OpKind::Rms,
        OpKind::GaussianTopk,
        OpKind::Moe,
        OpKind::GatedDeltaNet,
        OpKind::Mamba2,
        OpKind::MlaAttention,
    ];

    /// The name used in spec files (`op = "rms_norm"`).
    pub fn spec_name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::Linear => "linear",
            OpKind::RmsNorm => "rms_norm",
            OpKind::LayerNorm => "layer_norm",
            OpKind::Rope => "rope",
            OpKind::Attention => "attention",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::Scale => "scale",
            OpKind::Glu => "glu",
            OpKind::Activation => "activation",
            OpKind::Softcap => "softcap",
            OpKind::Split => "split",
            OpKind::Concat => "concat",
            OpKind::Mix => "mix",
            OpKind::Rms => "rms",
            OpKind::GaussianTopk => "gaussian_topk",
            OpKind::Moe => "moe",
            OpKind::GatedDeltaNet => "gated_delta_net",
            OpKind::Mamba2 => "mamba2",
            OpKind::MlaAttention => "mla_attention",
        }
    }

    pub fn from_spec_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.spec_name() == name)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec_name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingAttrs {
    pub vocab: usize,
    pub hidden: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttrs {
    pub in_features: usize,
    pub out_features: usize,
}

/// `y = x / rms(x) * (offset + w)`, computed independently over each group of
/// `group` consecutive features (`group == width` for a plain norm,
/// `group == head_dim` for per-head q/k norms).
#[derive(Debug, Clone, PartialEq)]
pub struct RmsNormAttrs {
    pub width: usize,
    pub group: usize,
    pub eps: f32,
    pub offset: f32,
}

/// Which features a rotation pairs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Feature `j` pairs with `j + rotary_dim/2` (GPT-NeoX / HF `rotate_half`).
    Half,
    /// Feature `2j` pairs with `2j + 1` (GPT-J / llama.cpp's GGUF layout).
    Interleaved,
}

/// Frequency scaling schemes, parsed from `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    Yarn {
        factor: f64,
        original_max_position: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
        /// Round the correction range to whole dimensions (default true).
        truncate: bool,
        /// Scale of cos/sin; derived from `factor` and the mscales if None.
        attention_factor: Option<f64>,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position: f64,
        /// The context the scaling extends to (0 when unknown): with
        /// `original_max_position` it gives the default attention factor.
        max_position: f64,
        attention_factor: Option<f64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeAttrs {
    pub heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub theta: f64,
    pub scaling: RopeScaling,
    pub style: RopeStyle,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionAttrs {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
    pub softcap: Option<f32>,
    /// Index of this op's KV cache slot among all attention ops of the model.
    pub cache_slot: usize,
    /// The layer whose keys and values this op attends over (KV sharing):
    /// it then computes no k/v of its own, writes nothing, and
    /// `cache_slot` is that layer's slot.
    pub kv_from: Option<usize>,
}

/// `x · factor`, times a per-feature weight when the op has one.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleAttrs {
    pub factor: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ActivationFn {
    Silu,
    Gelu,
    GeluTanh,
    Relu,
    Relu2,
    Sigmoid,
    Tanh,
}

impl ActivationFn {
    pub fn from_spec_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "relu2" => Self::Relu2,
            "sigmoid" => Self::Sigmoid,
            "tanh" => Self::Tanh,
            _ => return None,
        })
    }
    /// The activation's number in the CUDA kernels (`pie_act`,
    /// `kernels/cuda/elementwise.cu`): the drivers pass it, and codegen
    /// bakes it into specialized kernels.
    pub fn kernel_code(self) -> i32 {
        match self {
            Self::Silu => 0,
            Self::Gelu => 1,
            Self::GeluTanh => 2,
            Self::Relu => 3,
            Self::Relu2 => 4,
            Self::Sigmoid => 5,
            Self::Tanh => 6,
        }
    }
    pub fn spec_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_tanh",
            Self::Relu => "relu",
            Self::Relu2 => "relu2",
            Self::Sigmoid => "sigmoid",
            Self::Tanh => "tanh",
        }
    }
    pub const NAMES: [&'static str; 7] = [
        "silu",
        "gelu",
        "gelu_tanh",
        "relu",
        "relu2",
        "sigmoid",
        "tanh",
    ];
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivationAttrs {
    pub func: ActivationFn,
    pub width: usize,
}

/// `out = act(gate) * up`; with `limit`, the clamped SwiGLU of GPT-OSS.
#[derive(Debug, Clone, PartialEq)]
pub struct GluAttrs {
    pub func: ActivationFn,
    pub width: usize,
    pub limit: Option<f32>,
}

/// `(x - mean) / sqrt(var + eps) · weight + bias` over the whole width.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormAttrs {
    pub width: usize,
    pub eps: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SoftcapAttrs {
    pub cap: f32,
}

/// Splits features into parts. With `group` < width the input is a run of
/// groups (e.g. heads) and each group is split by `sizes`; every output
/// collects its part from all groups, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitAttrs {
    pub sizes: Vec<usize>,
    pub group: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ElementwiseAttrs {
    pub width: usize,
}

/// Joins activations feature-wise, in order (the inverse of `split`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConcatAttrs {
    pub widths: Vec<usize>,
}

/// A per-token matrix product: `in` is `streams` equal parts of `width`
/// features, `coefs` holds `out_streams × streams` numbers per token, and
/// output part `m` is `Σ_n (offset + coefs[m·streams + n]) · in part n`.
/// Mixes parallel residual streams (AltUp) or, with one stream, scales
/// one vector per output part by a per-token number.
#[derive(Debug, Clone, PartialEq)]
pub struct MixAttrs {
    pub streams: usize,
    pub out_streams: usize,
    /// Features of one stream.
    pub width: usize,
    pub offset: f32,
}

/// The root mean square of each group of `group` features: one number per
/// group (`sqrt(mean(x²))`).
#[derive(Debug, Clone, PartialEq)]
pub struct RmsAttrs {
    pub width: usize,
    pub group: usize,
}

/// Keeps each row's features above the `sparsity` quantile of a normal
/// distribution fitted to the row, shifted down by that cutoff:
/// `relu(x − mean − z·std)` with `z = Φ⁻¹(sparsity)` (population std).
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianTopkAttrs {
    pub width: usize,
    pub sparsity: f32,
    /// `Φ⁻¹(sparsity)`, computed once at lowering so drivers agree.
    pub std_multiplier: f32,
}

/// A concrete attribute value of a composite op.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    List(Vec<AttrValue>),
}

/// Attributes of composite ops (`moe`, `gated_delta_net`, `mamba2`,
/// `mla_attention`) in spec order; which keys each op needs is checked
/// during lowering (see `ops.rs`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompositeAttrs {
    pub attrs: Vec<(String, AttrValue)>,
    /// The rotary embedding of ops that rotate (MLA's rope part), resolved
    /// and checked at lowering.
    pub rope: Option<RopeAttrs>,
}

impl CompositeAttrs {
    pub fn get(&self, key: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A non-negative integer attribute (None when absent or null).
    pub fn usize(&self, key: &str) -> Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(AttrValue::List(l)) if l.is_empty() => Ok(None),
            Some(AttrValue::Int(i)) if *i >= 0 => Ok(Some(*i as usize)),
            Some(v) => Err(format!("`{key}` must be a non-negative integer, got {v:?}")),
        }
    }

    /// A number attribute (None when absent or null).
    pub fn float(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(AttrValue::List(l)) if l.is_empty() => Ok(None),
            Some(AttrValue::Int(i)) => Ok(Some(*i as f64)),
            Some(AttrValue::Float(f)) => Ok(Some(*f)),
            Some(v) => Err(format!("`{key}` must be a number, got {v:?}")),
        }
    }

    /// A boolean attribute (false when absent or null).
    pub fn flag(&self, key: &str) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(false),
            Some(AttrValue::List(l)) if l.is_empty() => Ok(false),
            Some(AttrValue::Bool(b)) => Ok(*b),
            Some(v) => Err(format!("`{key}` must be true or false, got {v:?}")),
        }
    }

    /// A name attribute such as `routing` (None when absent).
    pub fn name(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(AttrValue::Str(s)) => Some(s),
            _ => None,
        }
    }
}

// ------------------------------------------------------------- the model graph

use crate::value::Value;

/// One architecture bound to one config: the graph a driver runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub arch: String,
    pub spec_path: String,
    /// Every parameter's bound value, in declaration order.
    pub params: Vec<(String, Value)>,
    pub hidden: usize,
    /// Width of the residual stream `x` between sections: `hidden` unless
    /// the spec's `residual` parameter widens it (several parallel streams,
    /// or per-layer inputs carried along).
    pub residual: usize,
    pub vocab: usize,
    pub prologue: Vec<Node>,
    pub layers: Vec<Layer>,
    pub epilogue: Vec<Node>,
    /// One entry per attention op, in execution order.
    pub kv_slots: Vec<KvSlot>,
    /// One entry per recurrent op (Gated DeltaNet, Mamba2), in execution
    /// order: the per-sequence state it carries from token to token.
    pub state_slots: Vec<StateSlot>,
}

impl Model {
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Every node of the model, in execution order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.prologue
            .iter()
            .chain(self.layers.iter().flat_map(|l| l.nodes.iter()))
            .chain(self.epilogue.iter())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub index: usize,
    /// Name and position of the `[[layer]]` block this layer instantiates.
    pub block: String,
    pub block_index: usize,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvSlot {
    pub layer: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// A recurrent op's per-sequence state: the last `conv_kernel - 1` inputs
/// of its causal convolution plus its SSM / delta-rule state, as f32s.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSlot {
    pub layer: usize,
    pub conv: usize,
    pub ssm: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: NodeOp,
    /// False when the op's `if` evaluated to false: it passes its input on.
    pub enabled: bool,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub weights: Vec<WeightBinding>,
    pub out_widths: Vec<usize>,
    /// `spec.toml:line:col` of the op, for messages.
    pub origin: String,
}

impl Node {
    pub fn kind(&self) -> OpKind {
        self.op.kind()
    }
    pub fn weight(&self, key: &str) -> Option<&WeightBinding> {
        self.weights.iter().find(|w| w.key == key)
    }
}

/// A weight an op uses: its tensor name in the checkpoint (None when the
/// weight's `if` is false) and the shape the op requires (None where the op
/// does not fix it).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightBinding {
    pub key: String,
    pub name: Option<String>,
    /// The name with the layer index left as `{i}`, for display.
    pub template: Option<String>,
    pub shape: Option<Vec<usize>>,
    /// Set for the per-expert weights of a `moe` op; `shape` is then one
    /// expert's shape as the driver computes with it (`[out, in]`).
    pub experts: Option<ExpertLayout>,
}

/// How a `moe` op's expert tensors sit in the checkpoint: one tensor per
/// expert (`{e}` in the name) or all experts stacked as `[count, ..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertLayout {
    pub count: usize,
    /// Each expert matrix is stored `[in, out]` (GPT-OSS), not `[out, in]`.
    pub transposed: bool,
    /// This (fused gate/up) tensor alternates gate and up features
    /// (GPT-OSS) instead of holding all gate features, then all up features.
    pub interleaved: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeOp {
    Embedding(EmbeddingAttrs),
    Linear(LinearAttrs),
    RmsNorm(RmsNormAttrs),
    Rope(RopeAttrs),
    Attention(AttentionAttrs),
    Add(ElementwiseAttrs),
    Mul(ElementwiseAttrs),
    Scale(ScaleAttrs),
    Glu(GluAttrs),
    Activation(ActivationAttrs),
    Softcap(SoftcapAttrs),
    LayerNorm(LayerNormAttrs),
    Split(SplitAttrs),
    Concat(ConcatAttrs),
    Mix(MixAttrs),
    Rms(RmsAttrs),
    GaussianTopk(GaussianTopkAttrs),
    Composite(OpKind, CompositeAttrs),
}

impl NodeOp {
    pub fn kind(&self) -> OpKind {
        match self {
            NodeOp::Embedding(_) => OpKind::Embedding,
            NodeOp::Linear(_) => OpKind::Linear,
            NodeOp::RmsNorm(_) => OpKind::RmsNorm,
            NodeOp::Rope(_) => OpKind::Rope,
            NodeOp::Attention(_) => OpKind::Attention,
            NodeOp::Add(_) => OpKind::Add,
            NodeOp::Mul(_) => OpKind::Mul,
            NodeOp::Scale(_) => OpKind::Scale,
            NodeOp::Glu(_) => OpKind::Glu,
            NodeOp::Activation(_) => OpKind::Activation,
            NodeOp::Softcap(_) => OpKind::Softcap,
            NodeOp::LayerNorm(_) => OpKind::LayerNorm,
            NodeOp::Split(_) => OpKind::Split,
            NodeOp::Concat(_) => OpKind::Concat,
            NodeOp::Mix(_) => OpKind::Mix,
            NodeOp::Rms(_) => OpKind::Rms,
            NodeOp::GaussianTopk(_) => OpKind::GaussianTopk,
            NodeOp::Composite(k, _) => *k,
        }
    }
}
