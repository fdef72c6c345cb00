//! The op signatures of the spec language: which keys each op takes and what
//! they mean. Parsing checks spec files against this table; lowering reads
//! attributes through it.

use crate::ir::OpKind;

/// How an attribute's TOML value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    /// An expression over parameters (a string) or a literal number/bool.
    Expr,
    /// One of a fixed set of names (a plain string, not an expression).
    Name(&'static [&'static str]),
    /// A list of expressions.
    ExprList,
}

#[derive(Debug, Clone, Copy)]
pub struct AttrSpec {
    pub key: &'static str,
    pub kind: AttrKind,
    pub required: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct WeightSpec {
    pub key: &'static str,
    pub required: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct OpSchema {
    pub kind: OpKind,
    /// Keys naming input activations. `in` may hold a list for n-ary ops.
    pub inputs: &'static [&'static str],
    /// Number of activations `in` holds when it is a list (add/mul);
    /// [`ANY_ARITY`] for a list of any length (concat).
    pub in_arity: usize,
    /// Inputs a declaration may leave out (attention's `k`/`v` when it
    /// reads another layer's cache).
    pub optional_inputs: &'static [&'static str],
    /// Whether `out` is a list of names (split).
    pub multi_out: bool,
    pub weights: &'static [WeightSpec],
    pub attrs: &'static [AttrSpec],
    pub summary: &'static str,
}

/// `in_arity` of ops taking a list of one or more inputs.
pub const ANY_ARITY: usize = 0;

const fn w(key: &'static str) -> WeightSpec {
    WeightSpec {
        key,
        required: true,
    }
}
const fn w_opt(key: &'static str) -> WeightSpec {
    WeightSpec {
        key,
        required: false,
    }
}
const fn a(key: &'static str) -> AttrSpec {
    AttrSpec {
        key,
        kind: AttrKind::Expr,
        required: true,
    }
}
const fn a_opt(key: &'static str) -> AttrSpec {
    AttrSpec {
        key,
        kind: AttrKind::Expr,
        required: false,
    }
}
const fn name_opt(key: &'static str, names: &'static [&'static str]) -> AttrSpec {
    AttrSpec {
        key,
        kind: AttrKind::Name(names),
        required: false,
    }
}

pub const ACTIVATIONS: &[&str] = &crate::ir::ActivationFn::NAMES;
pub const ROPE_STYLES: &[&str] = &["half", "interleaved"];
pub const ROUTINGS: &[&str] = &[
    "softmax_topk",
    "sparsemixer",
    "topk_softmax",
    "softmax_group_topk",
    "sigmoid_group_topk",
];
pub const EXPERT_LAYOUTS: &[&str] = &["out_in", "in_out"];
pub const GATE_UP_ORDERS: &[&str] = &["concat", "interleaved"];

const fn schema(
    kind: OpKind,
    inputs: &'static [&'static str],
    weights: &'static [WeightSpec],
    attrs: &'static [AttrSpec],
    summary: &'static str,
) -> OpSchema {
    OpSchema {
        kind,
        inputs,
        in_arity: 1,
        optional_inputs: &[],
        multi_out: false,
        weights,
        attrs,
        summary,
    }
}

pub const SCHEMAS: &[OpSchema] = &[
    schema(
        OpKind::Embedding,
        &[],
        &[w("weight")],
        &[a_opt("vocab"), a_opt("hidden")],
        "rows of `weight` [vocab, hidden] for the batch's token ids",
    ),
    schema(
        OpKind::Linear,
        &["in"],
        &[w("weight"), w_opt("bias")],
        &[a("features")],
        "x · weightᵀ (+ bias); weight is [features, in_width]",
    ),
    schema(
        OpKind::RmsNorm,
        &["in"],
        &[w_opt("weight")],
        &[a("eps"), a_opt("offset"), a_opt("group")],
        "x / rms(x) * (offset + weight) over groups of `group` features",
    ),
    schema(
        OpKind::LayerNorm,
        &["in"],
        &[w_opt("weight"), w_opt("bias")],
        &[a("eps")],
        "(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the whole width",
    ),
    schema(
        OpKind::Rope,
        &["in"],
        &[],
        &[
            a("head_dim"),
            a("theta"),
            a_opt("rotary_dim"),
            a_opt("scaling"),
            a_opt("max_position"),
            name_opt("style", ROPE_STYLES),
        ],
        "rotary position embedding applied per head",
    ),
    OpSchema {
        optional_inputs: &["k", "v"],
        ..schema(
            OpKind::Attention,
            &["q", "k", "v"],
            &[w_opt("sinks")],
            &[
                a("heads"),
                a("kv_heads"),
                a("head_dim"),
                a_opt("v_head_dim"),
                a_opt("scale"),
                a_opt("window"),
                a_opt("softcap"),
                a_opt("kv_from"),
            ],
            "causal paged attention (GQA), writes k/v into this op's KV pages (kv_from: reads layer kv_from's pages instead)",
        )
    },
    OpSchema {
        in_arity: 2,
        ..schema(
            OpKind::Add,
            &["in"],
            &[],
            &[],
            "elementwise sum of two activations",
        )
    },
    OpSchema {
        in_arity: 2,
        ..schema(
            OpKind::Mul,
            &["in"],
            &[],
            &[],
            "elementwise product of two activations",
        )
    },
    schema(
        OpKind::Scale,
        &["in"],
        &[w_opt("weight")],
        &[a_opt("factor")],
        "x * factor (* weight, per feature)",
    ),
    schema(
        OpKind::Glu,
        &["gate", "up"],
        &[],
        &[name_opt("act", ACTIVATIONS), a_opt("limit")],
        "act(gate) * up (limit: GPT-OSS clamped SwiGLU)",
    ),
    schema(
        OpKind::Activation,
        &["in"],
        &[],
        &[AttrSpec {
            key: "fn",
            kind: AttrKind::Name(ACTIVATIONS),
            required: true,
        }],
        "elementwise activation function",
    ),
    schema(
        OpKind::Softcap,
        &["in"],
        &[],
        &[a("cap")],
        "tanh(x / cap) * cap",
    ),
    OpSchema {
        multi_out: true,
        ..schema(
            OpKind::Split,
            &["in"],
            &[],
            &[
                AttrSpec {
                    key: "sizes",
                    kind: AttrKind::ExprList,
                    required: true,
                },
                a_opt("group"),
            ],
            "splits features into consecutive parts (per group of `group` features)",
        )
    },
    OpSchema {
        in_arity: ANY_ARITY,
        ..schema(
            OpKind::Concat,
            &["in"],
            &[],
            &[],
            "joins activations feature-wise, in order",
        )
    },
    schema(
        OpKind::Mix,
        &["in", "coefs"],
        &[],
        &[a("streams"), a_opt("offset")],
        "per token: output part m = Σ_n (offset + coefs[m·streams + n]) · part n of `in`",
    ),
    schema(
        OpKind::Rms,
        &["in"],
        &[],
        &[a_opt("group")],
        "sqrt(mean(x²)) of each group of `group` features (one number per group)",
    ),
    schema(
        OpKind::GaussianTopk,
        &["in"],
        &[],
        &[a("sparsity")],
        "relu(x - mean - Φ⁻¹(sparsity)·std) per row: keeps what lies above the quantile",
    ),
    schema(
        OpKind::Moe,
        &["in"],
        &[
            w("router"),
            w_opt("router_bias"),
            w_opt("gate"),
            w_opt("up"),
            w_opt("gate_up"),
            w("down"),
            w_opt("gate_bias"),
            w_opt("up_bias"),
            w_opt("gate_up_bias"),
            w_opt("down_bias"),
            w_opt("shared_gate"),
            w_opt("shared_up"),
            w_opt("shared_down"),
            w_opt("shared_router"),
        ],
        &[
            a("hidden"),
            a("experts"),
            a("top_k"),
            a("intermediate"),
            name_opt("routing", ROUTINGS),
            a_opt("norm_topk"),
            name_opt("act", ACTIVATIONS),
            a_opt("limit"),
            a_opt("groups"),
            a_opt("topk_groups"),
            a_opt("routed_scale"),
            a_opt("shared_intermediate"),
            a_opt("jitter"),
            name_opt("expert_layout", EXPERT_LAYOUTS),
            name_opt("gate_up_order", GATE_UP_ORDERS),
        ],
        "mixture of experts; expert weight names may contain {e}",
    ),
    schema(
        OpKind::GatedDeltaNet,
        &["in"],
        &[
            w_opt("qkv"),
            w_opt("z"),
            w_opt("b"),
            w_opt("a"),
            w_opt("qkvz"),
            w_opt("ba"),
            w("conv"),
            w("dt_bias"),
            w("a_log"),
            w("norm"),
            w("out_proj"),
        ],
        &[
            a("hidden"),
            a("key_heads"),
            a("value_heads"),
            a("key_head_dim"),
            a("value_head_dim"),
            a("conv_kernel"),
            a("eps"),
        ],
        "Gated DeltaNet linear attention with a short causal conv (recurrent state)",
    ),
    schema(
        OpKind::Mamba2,
        &["in"],
        &[
            w("in_proj"),
            w("conv"),
            w_opt("conv_bias"),
            w("dt_bias"),
            w("a_log"),
            w("d"),
            w("norm"),
            w("out_proj"),
        ],
        &[
            a("hidden"),
            a("heads"),
            a("head_dim"),
            a("state"),
            a("groups"),
            a("conv_kernel"),
            a("eps"),
            a_opt("chunk"),
            a_opt("dt_min"),
        ],
        "Mamba2 selective state-space block (recurrent state)",
    ),
    schema(
        OpKind::MlaAttention,
        &["in"],
        &[
            w_opt("q"),
            w_opt("q_a"),
            w_opt("q_a_norm"),
            w_opt("q_b"),
            w("kv_a"),
            w("kv_a_norm"),
            w("kv_b"),
            w("o"),
            w_opt("indexer_wq"),
            w_opt("indexer_wk"),
            w_opt("indexer_k_norm"),
            w_opt("indexer_k_norm_bias"),
            w_opt("indexer_weights"),
        ],
        &[
            a("hidden"),
            a("heads"),
            a_opt("q_lora_rank"),
            a("kv_lora_rank"),
            a("qk_nope_head_dim"),
            a("qk_rope_head_dim"),
            a("v_head_dim"),
            a("eps"),
            a("theta"),
            a_opt("scaling"),
            a_opt("scale"),
            a_opt("rope_interleave"),
            a_opt("index_topk"),
            a_opt("index_heads"),
            a_opt("index_head_dim"),
        ],
        "multi-head latent attention: caches the compressed latent + rope key",
    ),
];

pub fn schema_of(kind: OpKind) -> &'static OpSchema {
    SCHEMAS
        .iter()
        .find(|s| s.kind == kind)
        .expect("every OpKind has a schema")
}

impl OpSchema {
    /// Every key an op declaration may use.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        ["op", "if", "out"]
            .into_iter()
            .chain(self.inputs.iter().copied())
            .chain(self.weights.iter().map(|w| w.key))
            .chain(self.attrs.iter().map(|a| a.key))
    }

    pub fn weight(&self, key: &str) -> Option<&WeightSpec> {
        self.weights.iter().find(|w| w.key == key)
    }

    pub fn attr(&self, key: &str) -> Option<&AttrSpec> {
        self.attrs.iter().find(|a| a.key == key)
    }
}
