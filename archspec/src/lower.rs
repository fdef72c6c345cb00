//! Lowering: a validated spec plus bound parameters become the concrete
//! graph IR (`ir::Model`): every attribute evaluated, every activation's
//! width known, every weight named with the shape its op needs.

use std::collections::HashMap;

use crate::bind::{bind, eval_expr, BindError};
use crate::ir::*;
use crate::spec::{AttrValue, OpDecl, Section, Spec, SpecExpr};
use crate::validate::LAYER_INDEX;
use crate::value::Value;

/// More layers than any published model has, by a wide margin.
pub const MAX_LAYERS: usize = 4096;

/// Binds `spec` to `config` and lowers it.
pub fn lower(
    spec: &Spec,
    config: &serde_json::Value,
    config_path: &str,
) -> Result<Model, BindError> {
    let bindings = bind(spec, config, config_path)?;
    let params: Vec<(String, Value)> = bindings
        .values
        .iter()
        .map(|(n, v, _)| (n.clone(), v.clone()))
        .collect();
    let param_map: HashMap<String, Value> = params.iter().cloned().collect();
    let get_usize = |name: &str| -> Result<usize, BindError> {
        match param_map.get(name).and_then(Value::as_i64) {
            Some(v) if v > 0 => Ok(v as usize),
            _ => Err(BindError(format!(
                "{config_path}: parameter `{name}` must be a positive integer, found {}",
                param_map
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            ))),
        }
    };
    let hidden = get_usize("hidden")?;
    let vocab = get_usize("vocab")?;
    let layers = get_usize("layers")?;
    // `x` is `hidden` wide unless the spec carries more between layers.
    let residual = match param_map.get("residual") {
        Some(_) => get_usize("residual")?,
        None => hidden,
    };
    // Checked before lowering allocates per layer: a corrupt or hostile
    // config must not make us build millions of layers.
    if layers > MAX_LAYERS {
        return Err(BindError(format!(
            "{config_path}: parameter `layers` = {layers} is beyond the supported maximum of {MAX_LAYERS}"
        )));
    }
    let mut lw = Lowerer {
        spec,
        params: &param_map,
        layer: None,
        kv_slots: Vec::new(),
        state_slots: Vec::new(),
        layer_kv_slots: HashMap::new(),
        index_slot: None,
    };
    let mut widths = HashMap::new();
    let prologue = lw.section(&spec.prologue, &mut widths)?;
    check_residual(spec, "the prologue", &widths, residual)?;
    let mut layer_list = Vec::with_capacity(layers);
    for i in 0..layers {
        lw.layer = Some(i);
        let (block_index, block) = lw.select_block(i)?;
        let mut widths = HashMap::from([("x".to_string(), residual)]);
        let nodes = lw.section(block, &mut widths)?;
        check_residual(spec, &format!("layer {i}"), &widths, residual)?;
        layer_list.push(Layer {
            index: i,
            block: block.name.clone(),
            block_index,
            nodes,
        });
    }
    lw.layer = None;
    let epilogue = lw.section(
        &spec.epilogue,
        &mut HashMap::from([("x".to_string(), residual)]),
    )?;
    let logits_width = epilogue.iter().rev().find_map(|n| {
        n.outputs
            .iter()
            .position(|o| o == "logits")
            .map(|p| n.out_widths[p])
    });
    if logits_width != Some(vocab) {
        return Err(BindError(format!(
            "{}: the epilogue's `logits` has width {:?}, expected vocab = {vocab}",
            spec.source.path, logits_width
        )));
    }
    Ok(Model {
        arch: spec.name.clone(),
        spec_path: spec.source.path.clone(),
        params,
        hidden,
        residual,
        vocab,
        prologue,
        layers: layer_list,
        epilogue,
        kv_slots: lw.kv_slots,
        state_slots: lw.state_slots,
    })
}

/// Every section must leave `x` as wide as the next one expects it.
fn check_residual(
    spec: &Spec,
    what: &str,
    widths: &HashMap<String, usize>,
    residual: usize,
) -> Result<(), BindError> {
    match widths.get("x") {
        Some(&w) if w == residual => Ok(()),
        w => Err(BindError(format!(
            "{}: {what} leaves `x` with width {}, expected {residual} (the `residual` parameter, or `hidden`)",
            spec.source.path,
            w.map_or("none".to_string(), |w| w.to_string())
        ))),
    }
}

struct Lowerer<'a> {
    spec: &'a Spec,
    params: &'a HashMap<String, Value>,
    layer: Option<usize>,
    kv_slots: Vec<KvSlot>,
    state_slots: Vec<StateSlot>,
    /// The KV slot of each layer's first attention op (for `kv_from`).
    layer_kv_slots: HashMap<usize, usize>,
    /// The indexer-key slot of the last MLA layer with a sparse indexer.
    index_slot: Option<usize>,
}

impl<'a> Lowerer<'a> {
    fn lookup(&self, name: &str) -> Option<Value> {
        if name == LAYER_INDEX {
            return self.layer.map(|i| Value::Int(i as i64));
        }
        self.params.get(name).cloned()
    }

    fn eval(&self, e: &SpecExpr, what: &str) -> Result<Value, BindError> {
        let what = match self.layer {
            Some(i) => format!("layer {i}: {what}"),
            None => what.to_string(),
        };
        eval_expr(self.spec, e, &|n| self.lookup(n), &what)
    }

    fn at(&self, span: &std::ops::Range<usize>) -> String {
        let (line, col) = self.spec.source.line_col(span.start);
        format!("{}:{line}:{col}", self.spec.source.path)
    }

    fn fail<T>(&self, op: &OpDecl, msg: impl std::fmt::Display) -> Result<T, BindError> {
        let layer = self
            .layer
            .map(|i| format!(" (layer {i})"))
            .unwrap_or_default();
        Err(BindError(format!(
            "{}: `{}`{layer}: {msg}",
            self.at(&op.span),
            op.kind
        )))
    }

    fn select_block(&self, i: usize) -> Result<(usize, &'a Section), BindError> {
        let mut matches = Vec::new();
        for (bi, block) in self.spec.layers.iter().enumerate() {
            let selected = match &block.when {
                None => true,
                Some(e) => match self
                    .eval(e, &format!("`when` of layer block `{}`", block.name))?
                    .truthy()
                {
                    Some(b) => b,
                    None => {
                        return Err(BindError(format!(
                            "{}: `when` must be a bool expression",
                            self.at(&e.span)
                        )))
                    }
                },
            };
            if selected {
                matches.push((bi, block));
            }
        }
        match matches.len() {
            1 => Ok(matches[0]),
            0 => Err(BindError(format!(
                "{}: layer {i} matches no [[layer]] block (check the blocks' `when` against the config)",
                self.spec.source.path
            ))),
            _ => Err(BindError(format!(
                "{}: layer {i} matches several [[layer]] blocks: {}",
                self.spec.source.path,
                matches.iter().map(|(_, b)| format!("`{}`", b.name)).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    fn section(
        &mut self,
        s: &Section,
        widths: &mut HashMap<String, usize>,
    ) -> Result<Vec<Node>, BindError> {
        let mut nodes = Vec::with_capacity(s.ops.len());
        for op in &s.ops {
            let node = self.op(s, op, widths)?;
            for (name, w) in node.outputs.iter().zip(&node.out_widths) {
                widths.insert(name.clone(), *w);
            }
            nodes.push(node);
        }
        Ok(nodes)
    }

    // ---------------------------------------------------------- attributes

    fn attr(&self, op: &OpDecl, key: &str) -> Result<Option<Value>, BindError> {
        match op.attr(key) {
            Some(AttrValue::Expr(e)) => {
                Ok(Some(self.eval(e, &format!("`{key}` of `{}`", op.kind))?))
            }
            Some(AttrValue::Name(n)) => Ok(Some(Value::Str(n.value.clone()))),
            Some(AttrValue::List(items)) => Ok(Some(Value::List(
                items
                    .iter()
                    .map(|e| self.eval(e, &format!("`{key}` of `{}`", op.kind)))
                    .collect::<Result<_, _>>()?,
            ))),
            None => Ok(None),
        }
    }

    fn usize_attr(
        &self,
        op: &OpDecl,
        key: &str,
        default: Option<usize>,
    ) -> Result<usize, BindError> {
        match self.attr(op, key)? {
            Some(v) => match v.as_i64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => self.fail(op, format!("`{key}` must be a positive integer, found {v}")),
            },
            None => match default {
                Some(d) => Ok(d),
                None => self.fail(op, format!("missing `{key}`")),
            },
        }
    }

    fn f64_attr(&self, op: &OpDecl, key: &str, default: Option<f64>) -> Result<f64, BindError> {
        match self.attr(op, key)? {
            Some(v) => match v.as_f64() {
                Some(x) => Ok(x),
                None => self.fail(op, format!("`{key}` must be a number, found {v}")),
            },
            None => match default {
                Some(d) => Ok(d),
                None => self.fail(op, format!("missing `{key}`")),
            },
        }
    }

    /// A number that may be null/absent (`window`, `softcap`).
    fn opt_f64_attr(&self, op: &OpDecl, key: &str) -> Result<Option<f64>, BindError> {
        match self.attr(op, key)? {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) => Ok(Some(x)),
                None => self.fail(op, format!("`{key}` must be a number or null, found {v}")),
            },
        }
    }

    fn name_attr(&self, op: &OpDecl, key: &str, default: &str) -> String {
        match op.attr(key) {
            Some(AttrValue::Name(n)) => n.value.clone(),
            _ => default.to_string(),
        }
    }

    // ---------------------------------------------------------- weights

    fn weight(
        &self,
        s: &Section,
        op: &OpDecl,
        key: &str,
        shape: Option<Vec<usize>>,
    ) -> Result<WeightBinding, BindError> {
        let Some(w) = op.weight(key) else {
            return Ok(WeightBinding {
                key: key.into(),
                name: None,
                template: None,
                shape,
                experts: None,
            });
        };
        if let Some(cond) = &w.cond {
            let v = self.eval(cond, &format!("`if` of weight `{key}`"))?;
            if v.truthy() != Some(true) {
                return Ok(WeightBinding {
                    key: key.into(),
                    name: None,
                    template: None,
                    shape,
                    experts: None,
                });
            }
        }
        if let (Some(to), Some(cond)) = (&w.tied_to, &w.tied_if) {
            if self
                .eval(cond, &format!("`tied_if` of weight `{key}`"))?
                .truthy()
                == Some(true)
            {
                let to = self.expand_params(op, &to.value)?;
                return Ok(WeightBinding {
                    key: key.into(),
                    name: Some(to.clone()),
                    template: Some(to),
                    shape,
                    experts: None,
                });
            }
        }
        let template = match &s.prefix {
            Some(p) => format!("{p}.{}", w.name.value),
            None => w.name.value.clone(),
        };
        let template = self.expand_params(op, &template)?;
        let name = match self.layer {
            Some(i) => template.replace("{i}", &i.to_string()),
            None => template.clone(),
        };
        Ok(WeightBinding {
            key: key.into(),
            name: Some(name),
            template: Some(template),
            shape,
            experts: None,
        })
    }

    // ---------------------------------------------------------- ops

    fn op(
        &mut self,
        s: &Section,
        op: &OpDecl,
        widths: &HashMap<String, usize>,
    ) -> Result<Node, BindError> {
        let enabled = match &op.cond {
            Some(c) => self.eval(c, &format!("`if` of `{}`", op.kind))?.truthy() == Some(true),
            None => true,
        };
        let inputs: Vec<String> = op
            .inputs
            .iter()
            .flat_map(|(_, names)| names.iter().map(|n| n.value.clone()))
            .collect();
        let in_widths: Vec<usize> = inputs.iter().map(|n| widths[n.as_str()]).collect();
        let outputs: Vec<String> = op.outputs.iter().map(|o| o.value.clone()).collect();
        let origin = self.at(&op.span);
        let w0 = in_widths.first().copied().unwrap_or(0);
        if !enabled {
            // Validation guarantees a conditional op maps `in` to itself.
            return Ok(Node {
                op: self.disabled_op(op, w0),
                enabled,
                inputs,
                outputs,
                weights: Vec::new(),
                out_widths: vec![w0],
                origin,
            });
        }
        let mut weights = Vec::new();
        let (node_op, out_widths) = match op.kind {
            OpKind::Embedding => {
                let vocab = self.usize_attr(
                    op,
                    "vocab",
                    self.params
                        .get("vocab")
                        .and_then(Value::as_i64)
                        .map(|v| v as usize),
                )?;
                let hidden = self.usize_attr(
                    op,
                    "hidden",
                    self.params
                        .get("hidden")
                        .and_then(Value::as_i64)
                        .map(|v| v as usize),
                )?;
                weights.push(self.weight(s, op, "weight", Some(vec![vocab, hidden]))?);
                (
                    NodeOp::Embedding(EmbeddingAttrs { vocab, hidden }),
                    vec![hidden],
                )
            }
            OpKind::Linear => {
                let features = self.usize_attr(op, "features", None)?;
                weights.push(self.weight(s, op, "weight", Some(vec![features, w0]))?);
                weights.push(self.weight(s, op, "bias", Some(vec![features]))?);
                (
                    NodeOp::Linear(LinearAttrs {
                        in_features: w0,
                        out_features: features,
                    }),
                    vec![features],
                )
            }
            OpKind::RmsNorm => {
                let group = self.usize_attr(op, "group", Some(w0))?;
                if w0 % group != 0 {
                    return self.fail(
                        op,
                        format!("`group` = {group} does not divide the input width {w0}"),
                    );
                }
                let eps = self.f64_attr(op, "eps", None)? as f32;
                let offset = self.f64_attr(op, "offset", Some(0.0))? as f32;
                weights.push(self.weight(s, op, "weight", Some(vec![group]))?);
                (
                    NodeOp::RmsNorm(RmsNormAttrs {
                        width: w0,
                        group,
                        eps,
                        offset,
                    }),
                    vec![w0],
                )
            }
            OpKind::LayerNorm => {
                let eps = self.f64_attr(op, "eps", None)? as f32;
                weights.push(self.weight(s, op, "weight", Some(vec![w0]))?);
                weights.push(self.weight(s, op, "bias", Some(vec![w0]))?);
                (
                    NodeOp::LayerNorm(LayerNormAttrs { width: w0, eps }),
                    vec![w0],
                )
            }
            OpKind::Rope => {
                let head_dim = self.usize_attr(op, "head_dim", None)?;
                let rotary_dim = self.usize_attr(op, "rotary_dim", Some(head_dim))?;
                if w0 % head_dim != 0 || rotary_dim > head_dim || rotary_dim % 2 != 0 {
                    return self.fail(op, format!("input width {w0}, head_dim {head_dim} and rotary_dim {rotary_dim} do not fit (width = heads × head_dim, even rotary_dim ≤ head_dim)"));
                }
                let theta = self.f64_attr(op, "theta", None)?;
                let mut scaling = match self.attr(op, "scaling")? {
                    None | Some(Value::Null) => RopeScaling::None,
                    Some(v) => parse_rope_scaling(&v).or_else(|m| self.fail(op, m))?,
                };
                // LongRoPE without `factor` takes it from the model's context
                // length (`max_position_embeddings`), as Phi-3 configs do.
                if let RopeScaling::LongRope { max_position, .. } = &mut scaling {
                    if *max_position == 0.0 {
                        *max_position = self.opt_f64_attr(op, "max_position")?.unwrap_or(0.0);
                    }
                }
                let style = match self.name_attr(op, "style", "half").as_str() {
                    "interleaved" => RopeStyle::Interleaved,
                    _ => RopeStyle::Half,
                };
                (
                    NodeOp::Rope(RopeAttrs {
                        heads: w0 / head_dim,
                        head_dim,
                        rotary_dim,
                        theta,
                        scaling,
                        style,
                    }),
                    vec![w0],
                )
            }
            OpKind::Attention => {
                let heads = self.usize_attr(op, "heads", None)?;
                let kv_heads = self.usize_attr(op, "kv_heads", None)?;
                let head_dim = self.usize_attr(op, "head_dim", None)?;
                let v_head_dim = self.usize_attr(op, "v_head_dim", Some(head_dim))?;
                let expect = [heads * head_dim, kv_heads * head_dim, kv_heads * v_head_dim];
                let kv_from = self.kv_from(op, inputs.len())?;
                for ((name, got), want) in inputs.iter().zip(&in_widths).zip(expect) {
                    if *got != want {
                        return self.fail(op, format!("input `{name}` has width {got}, expected {want} (heads={heads}, kv_heads={kv_heads}, head_dim={head_dim})"));
                    }
                }
                if heads % kv_heads != 0 {
                    return self.fail(
                        op,
                        format!("heads = {heads} is not a multiple of kv_heads = {kv_heads}"),
                    );
                }
                let scale =
                    self.f64_attr(op, "scale", Some(1.0 / (head_dim as f64).sqrt()))? as f32;
                let window = self
                    .opt_f64_attr(op, "window")?
                    .filter(|w| *w > 0.0)
                    .map(|w| w as usize);
                let softcap = self
                    .opt_f64_attr(op, "softcap")?
                    .filter(|c| *c > 0.0)
                    .map(|c| c as f32);
                weights.push(self.weight(s, op, "sinks", Some(vec![heads]))?);
                let shape = KvSlot {
                    layer: self.layer.unwrap_or(0),
                    kv_heads,
                    head_dim,
                    v_head_dim,
                };
                let cache_slot = match kv_from {
                    Some(from) => self.shared_kv_slot(op, from, &shape)?,
                    None => self.new_kv_slot(shape),
                };
                (
                    NodeOp::Attention(AttentionAttrs {
                        heads,
                        kv_heads,
                        head_dim,
                        v_head_dim,
                        scale,
                        window,
                        softcap,
                        cache_slot,
                        kv_from,
                    }),
                    vec![heads * v_head_dim],
                )
            }
            OpKind::Add | OpKind::Mul => {
                if in_widths[0] != in_widths[1] {
                    return self.fail(
                        op,
                        format!("inputs have widths {} and {}", in_widths[0], in_widths[1]),
                    );
                }
                let a = ElementwiseAttrs { width: w0 };
                (
                    if op.kind == OpKind::Add {
                        NodeOp::Add(a)
                    } else {
                        NodeOp::Mul(a)
                    },
                    vec![w0],
                )
            }
            OpKind::Scale => {
                weights.push(self.weight(s, op, "weight", Some(vec![w0]))?);
                (
                    NodeOp::Scale(ScaleAttrs {
                        factor: self.f64_attr(op, "factor", Some(1.0))? as f32,
                    }),
                    vec![w0],
                )
            }
            OpKind::Concat => {
                if in_widths.is_empty() {
                    return self.fail(op, "`in` must name at least one activation");
                }
                let total = in_widths.iter().sum();
                (
                    NodeOp::Concat(ConcatAttrs { widths: in_widths }),
                    vec![total],
                )
            }
            OpKind::Mix => self.mix(op, w0, in_widths[1])?,
            OpKind::Rms => {
                let group = self.usize_attr(op, "group", Some(w0))?;
                if w0 % group != 0 {
                    return self.fail(
                        op,
                        format!("`group` = {group} does not divide the input width {w0}"),
                    );
                }
                (NodeOp::Rms(RmsAttrs { width: w0, group }), vec![w0 / group])
            }
            OpKind::GaussianTopk => {
                let sparsity = self.f64_attr(op, "sparsity", None)?;
                if !(sparsity > 0.0 && sparsity < 1.0) {
                    return self.fail(
                        op,
                        format!("`sparsity` must lie strictly between 0 and 1, found {sparsity}"),
                    );
                }
                (
                    NodeOp::GaussianTopk(GaussianTopkAttrs {
                        width: w0,
                        sparsity: sparsity as f32,
                        std_multiplier: crate::normal::quantile(sparsity) as f32,
                    }),
                    vec![w0],
                )
            }
            OpKind::Softcap => (
                NodeOp::Softcap(SoftcapAttrs {
                    cap: self.f64_attr(op, "cap", None)? as f32,
                }),
                vec![w0],
            ),
            OpKind::Glu => {
                if in_widths[0] != in_widths[1] {
                    return self.fail(
                        op,
                        format!(
                            "`gate` has width {} but `up` has width {}",
                            in_widths[0], in_widths[1]
                        ),
                    );
                }
                let func = ActivationFn::from_spec_name(&self.name_attr(op, "act", "silu"))
                    .unwrap_or(ActivationFn::Silu);
                let limit = self.opt_f64_attr(op, "limit")?.map(|l| l as f32);
                (
                    NodeOp::Glu(GluAttrs {
                        func,
                        width: w0,
                        limit,
                    }),
                    vec![w0],
                )
            }
            OpKind::Activation => {
                let func = ActivationFn::from_spec_name(&self.name_attr(op, "fn", "silu"))
                    .unwrap_or(ActivationFn::Silu);
                (
                    NodeOp::Activation(ActivationAttrs { func, width: w0 }),
                    vec![w0],
                )
            }
            OpKind::Split => {
                let sizes: Vec<usize> = match self.attr(op, "sizes")? {
                    Some(Value::List(items)) => items
                        .iter()
                        .map(|v| v.as_i64().filter(|n| *n > 0).map(|n| n as usize))
                        .collect::<Option<_>>()
                        .map_or_else(|| self.fail(op, "`sizes` must be positive integers"), Ok)?,
                    _ => return self.fail(op, "`sizes` must be a list"),
                };
                let group = self.usize_attr(op, "group", Some(w0))?;
                if sizes.iter().sum::<usize>() != group
                    || w0 % group != 0
                    || sizes.len() != outputs.len()
                {
                    return self.fail(op, format!("sizes {sizes:?} must sum to the group width {group} (which divides the input width {w0}) and match the {} outputs", outputs.len()));
                }
                let groups = w0 / group;
                let widths = sizes.iter().map(|s| s * groups).collect();
                (NodeOp::Split(SplitAttrs { sizes, group }), widths)
            }
            OpKind::Moe | OpKind::GatedDeltaNet | OpKind::Mamba2 | OpKind::MlaAttention => {
                let schema = crate::ops::schema_of(op.kind);
                let mut attrs = CompositeAttrs::default();
                for a in schema.attrs {
                    if let Some(v) = self.attr(op, a.key)? {
                        attrs.attrs.push((
                            a.key.to_string(),
                            to_attr_value(&v)
                                .or_else(|m| self.fail(op, format!("`{}`: {m}", a.key)))?,
                        ));
                    }
                }
                // Expert weight names keep `{e}` for the loader to expand.
                for w in schema.weights {
                    weights.push(self.weight(s, op, w.key, None)?);
                }
                let hidden = self.usize_attr(op, "hidden", None)?;
                if op.kind == OpKind::Moe {
                    self.bind_moe_weights(op, hidden, &mut weights)?;
                }
                if op.kind == OpKind::GatedDeltaNet {
                    self.bind_gdn_shapes(op, hidden, &mut weights)?;
                }
                if op.kind == OpKind::MlaAttention {
                    let kv_lora = self.usize_attr(op, "kv_lora_rank", None)?;
                    let rope = self.usize_attr(op, "qk_rope_head_dim", None)?;
                    // The latent cache holds one compressed vector plus the
                    // shared rope key per token, whatever the head count.
                    let cache_slot = self.kv_slots.len();
                    self.kv_slots.push(KvSlot {
                        layer: self.layer.unwrap_or(0),
                        kv_heads: 1,
                        head_dim: kv_lora + rope,
                        v_head_dim: 0,
                    });
                    attrs.attrs.push((
                        "cache_slot".into(),
                        crate::ir::AttrValue::Int(cache_slot as i64),
                    ));
                    self.bind_mla_rope(op, &mut attrs)?;
                    self.bind_mla_indexer(op, &mut weights, &mut attrs)?;
                }
                if let Some(slot) = self.state_slot(op)? {
                    attrs.attrs.push((
                        "state_slot".into(),
                        crate::ir::AttrValue::Int(self.state_slots.len() as i64),
                    ));
                    self.state_slots.push(slot);
                }
                (NodeOp::Composite(op.kind, attrs), vec![hidden])
            }
        };
        Ok(Node {
            op: node_op,
            enabled,
            inputs,
            outputs,
            weights,
            out_widths,
            origin,
        })
    }

    /// Weight names may hold `{param}` for a string parameter (the same
    /// layers under another prefix in a multimodal checkpoint); `{i}` (the
    /// layer) and `{e}` (the expert) are left for later.
    fn expand_params(&self, op: &OpDecl, name: &str) -> Result<String, BindError> {
        let mut out = String::with_capacity(name.len());
        let mut rest = name;
        while let Some(open) = rest.find('{') {
            let Some(len) = rest[open..].find('}') else {
                break;
            };
            let key = &rest[open + 1..open + len];
            out.push_str(&rest[..open]);
            match (key, self.params.get(key)) {
                ("i" | "e", _) => out.push_str(&rest[open..=open + len]),
                (_, Some(Value::Str(v))) => out.push_str(v),
                _ => {
                    return self.fail(
                        op,
                        format!("weight name `{name}`: `{{{key}}}` is not a string parameter"),
                    )
                }
            }
            rest = &rest[open + len + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn new_kv_slot(&mut self, shape: KvSlot) -> usize {
        let slot = self.kv_slots.len();
        if let Some(layer) = self.layer {
            self.layer_kv_slots.entry(layer).or_insert(slot);
        }
        self.kv_slots.push(shape);
        slot
    }

    /// `kv_from` of an attention op: the earlier layer whose cache it
    /// reads. Such an op takes no `k`/`v`; any other op needs both.
    fn kv_from(&self, op: &OpDecl, inputs: usize) -> Result<Option<usize>, BindError> {
        let from = match self.attr(op, "kv_from")? {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) if n >= 0 => Some(n as usize),
                _ => return self.fail(op, format!("`kv_from` must be a layer index, found {v}")),
            },
        };
        match (from, inputs) {
            (None, 3) | (Some(_), 1) => Ok(from),
            (None, _) => self.fail(
                op,
                "needs `k` and `v` (or `kv_from` to read another layer's cache)",
            ),
            (Some(_), _) => self.fail(
                op,
                "with `kv_from` the op reads another layer's keys and values; drop `k` and `v`",
            ),
        }
    }

    /// The slot of layer `from`'s attention, which must be earlier and
    /// cache keys and values of this op's shape.
    fn shared_kv_slot(&self, op: &OpDecl, from: usize, shape: &KvSlot) -> Result<usize, BindError> {
        let here = self.layer.unwrap_or(0);
        let slot = match self.layer_kv_slots.get(&from) {
            Some(&slot) if from < here => slot,
            _ => {
                return self.fail(
                    op,
                    format!(
                    "`kv_from` = {from} must name an earlier layer with its own attention cache"
                ),
                )
            }
        };
        let src = &self.kv_slots[slot];
        if (src.kv_heads, src.head_dim, src.v_head_dim)
            != (shape.kv_heads, shape.head_dim, shape.v_head_dim)
        {
            return self.fail(
                op,
                format!(
                    "layer {from} caches {} kv heads of {}/{} features, this op needs {}/{}/{}",
                    src.kv_heads,
                    src.head_dim,
                    src.v_head_dim,
                    shape.kv_heads,
                    shape.head_dim,
                    shape.v_head_dim
                ),
            );
        }
        Ok(slot)
    }

    /// `mix`: `in` holds `streams` parts; `coefs` one row of
    /// `out_streams × streams` numbers per token.
    fn mix(
        &self,
        op: &OpDecl,
        in_width: usize,
        coefs_width: usize,
    ) -> Result<(NodeOp, Vec<usize>), BindError> {
        let streams = self.usize_attr(op, "streams", None)?;
        if !in_width.is_multiple_of(streams) || !coefs_width.is_multiple_of(streams) {
            return self.fail(
                op,
                format!("`streams` = {streams} must divide both the input width {in_width} and the `coefs` width {coefs_width}"),
            );
        }
        let (out_streams, width) = (coefs_width / streams, in_width / streams);
        let offset = self.f64_attr(op, "offset", Some(0.0))? as f32;
        Ok((
            NodeOp::Mix(MixAttrs {
                streams,
                out_streams,
                width,
                offset,
            }),
            vec![out_streams * width],
        ))
    }

    /// DeepSeek sparse attention (GLM-MoE-DSA): a layer with indexer
    /// weights caches one roped indexer key (`index_head_dim` values) per
    /// token in a slot of its own and picks each query's keys; a layer that
    /// declares `index_topk` without them reuses the picks of the last such
    /// layer in the same pass. Both get `index_slot`, the indexer-key slot
    /// that made the picks.
    fn bind_mla_indexer(
        &mut self,
        op: &OpDecl,
        weights: &mut [WeightBinding],
        attrs: &mut CompositeAttrs,
    ) -> Result<(), BindError> {
        if self.attr(op, "index_topk")?.is_none() {
            return Ok(());
        }
        self.usize_attr(op, "index_topk", None)?;
        let bound = |key: &str| weights.iter().any(|w| w.key == key && w.name.is_some());
        let slot = if bound("indexer_wk") {
            let hidden = self.usize_attr(op, "hidden", None)?;
            let heads = self.usize_attr(op, "index_heads", None)?;
            let head_dim = self.usize_attr(op, "index_head_dim", None)?;
            let rope = self.usize_attr(op, "qk_rope_head_dim", None)?;
            if rope > head_dim {
                return self.fail(
                    op,
                    format!("qk_rope_head_dim {rope} exceeds index_head_dim {head_dim}"),
                );
            }
            // The indexer's queries come from the low-rank query path.
            let rank = match self.attr(op, "q_lora_rank")? {
                None | Some(Value::Null) => {
                    return self.fail(op, "the sparse indexer needs `q_lora_rank`")
                }
                Some(_) => self.usize_attr(op, "q_lora_rank", None)?,
            };
            for w in weights.iter_mut() {
                let shape = match w.key.as_str() {
                    "indexer_wq" => vec![heads * head_dim, rank],
                    "indexer_wk" => vec![head_dim, hidden],
                    "indexer_k_norm" | "indexer_k_norm_bias" => vec![head_dim],
                    "indexer_weights" => vec![heads, hidden],
                    _ => continue,
                };
                if w.name.is_none() {
                    return self.fail(op, format!("the sparse indexer needs weight `{}`", w.key));
                }
                w.shape = Some(shape);
            }
            let slot = self.kv_slots.len();
            self.kv_slots.push(KvSlot {
                layer: self.layer.unwrap_or(0),
                kv_heads: 1,
                head_dim,
                v_head_dim: 0,
            });
            self.index_slot = Some(slot);
            slot
        } else {
            match self.index_slot {
                Some(slot) => slot,
                None => {
                    return self.fail(
                        op,
                        "a layer sharing the sparse indexer's picks needs an earlier layer with indexer weights",
                    )
                }
            }
        };
        attrs
            .attrs
            .push(("index_slot".into(), crate::ir::AttrValue::Int(slot as i64)));
        Ok(())
    }

    /// MLA's rope (shared by all heads' rope part) and softmax scale: the
    /// YaRN `mscale_all_dim` correction squared, as DeepSeek applies it.
    fn bind_mla_rope(&self, op: &OpDecl, attrs: &mut CompositeAttrs) -> Result<(), BindError> {
        let heads = self.usize_attr(op, "heads", None)?;
        let rope = self.usize_attr(op, "qk_rope_head_dim", None)?;
        let nope = self.usize_attr(op, "qk_nope_head_dim", None)?;
        let scaling = match self.attr(op, "scaling")? {
            None | Some(Value::Null) => RopeScaling::None,
            Some(v) => parse_rope_scaling(&v).or_else(|m| self.fail(op, m))?,
        };
        let interleave = matches!(self.attr(op, "rope_interleave")?, Some(Value::Bool(true)));
        if rope % 2 != 0 {
            return self.fail(op, format!("qk_rope_head_dim {rope} must be even"));
        }
        if self.opt_f64_attr(op, "scale")?.is_none() {
            let mut scale = 1.0 / ((nope + rope) as f64).sqrt();
            if let RopeScaling::Yarn {
                factor,
                mscale_all_dim,
                ..
            } = &scaling
            {
                if *mscale_all_dim != 0.0 && *factor > 1.0 {
                    let m = 0.1 * mscale_all_dim * factor.ln() + 1.0;
                    scale *= m * m;
                }
            }
            attrs
                .attrs
                .push(("scale".into(), crate::ir::AttrValue::Float(scale)));
        }
        attrs.rope = Some(RopeAttrs {
            heads,
            head_dim: rope,
            rotary_dim: rope,
            theta: self.f64_attr(op, "theta", None)?,
            scaling,
            style: if interleave {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Half
            },
        });
        Ok(())
    }

    /// Shapes of a Gated DeltaNet op's weights (checked at load; random
    /// weights for benchmarks need them).
    fn bind_gdn_shapes(
        &self,
        op: &OpDecl,
        hidden: usize,
        weights: &mut [WeightBinding],
    ) -> Result<(), BindError> {
        let u = |key| self.usize_attr(op, key, None);
        let (kh, vh, dk, dv, k) = (
            u("key_heads")?,
            u("value_heads")?,
            u("key_head_dim")?,
            u("value_head_dim")?,
            u("conv_kernel")?,
        );
        let r = vh.checked_div(kh).unwrap_or(0);
        let conv_dim = 2 * kh * dk + vh * dv;
        for w in weights.iter_mut().filter(|w| w.name.is_some()) {
            w.shape = Some(match w.key.as_str() {
                "qkv" => vec![conv_dim, hidden],
                "z" => vec![vh * dv, hidden],
                "b" | "a" => vec![vh, hidden],
                "qkvz" => vec![kh * (2 * dk + 2 * r * dv), hidden],
                "ba" => vec![2 * vh, hidden],
                "conv" => vec![conv_dim, 1, k],
                "dt_bias" | "a_log" => vec![vh],
                "norm" => vec![dv],
                "out_proj" => vec![hidden, vh * dv],
                _ => continue,
            });
        }
        Ok(())
    }

    /// The recurrent state a Gated DeltaNet or Mamba2 op keeps per sequence.
    fn state_slot(&self, op: &OpDecl) -> Result<Option<StateSlot>, BindError> {
        let u = |key| self.usize_attr(op, key, None);
        let (conv_channels, ssm) = match op.kind {
            OpKind::GatedDeltaNet => {
                let (kh, vh) = (u("key_heads")?, u("value_heads")?);
                let (dk, dv) = (u("key_head_dim")?, u("value_head_dim")?);
                if kh == 0 || vh % kh != 0 {
                    return self.fail(
                        op,
                        format!("value_heads {vh} must be a multiple of key_heads {kh}"),
                    );
                }
                (2 * kh * dk + vh * dv, vh * dk * dv)
            }
            OpKind::Mamba2 => {
                let (heads, hd) = (u("heads")?, u("head_dim")?);
                let (groups, state) = (u("groups")?, u("state")?);
                if groups == 0 || heads % groups != 0 {
                    return self.fail(
                        op,
                        format!("heads {heads} must be a multiple of groups {groups}"),
                    );
                }
                (heads * hd + 2 * groups * state, heads * hd * state)
            }
            _ => return Ok(None),
        };
        let kernel = u("conv_kernel")?;
        if kernel == 0 {
            return self.fail(op, "`conv_kernel` must be at least 1");
        }
        Ok(Some(StateSlot {
            layer: self.layer.unwrap_or(0),
            conv: conv_channels * (kernel - 1),
            ssm,
        }))
    }

    /// Shapes of a `moe` op's weights, and the expert layout of the
    /// per-expert ones.
    fn bind_moe_weights(
        &self,
        op: &OpDecl,
        hidden: usize,
        weights: &mut [WeightBinding],
    ) -> Result<(), BindError> {
        let experts = self.usize_attr(op, "experts", None)?;
        let inter = self.usize_attr(op, "intermediate", None)?;
        let shared = self.usize_attr(op, "shared_intermediate", Some(0))?;
        let layout = ExpertLayout {
            count: experts,
            transposed: self.name_attr(op, "expert_layout", "out_in") == "in_out",
            interleaved: self.name_attr(op, "gate_up_order", "concat") == "interleaved",
        };
        for w in weights.iter_mut().filter(|w| w.name.is_some()) {
            let (shape, per_expert) = match w.key.as_str() {
                "router" => (vec![experts, hidden], false),
                "router_bias" => (vec![experts], false),
                "gate" | "up" => (vec![inter, hidden], true),
                "gate_up" => (vec![2 * inter, hidden], true),
                "down" => (vec![hidden, inter], true),
                "gate_bias" | "up_bias" => (vec![inter], true),
                "gate_up_bias" => (vec![2 * inter], true),
                "down_bias" => (vec![hidden], true),
                "shared_gate" | "shared_up" => (vec![shared, hidden], false),
                "shared_down" => (vec![hidden, shared], false),
                "shared_router" => (vec![1, hidden], false),
                _ => continue,
            };
            if !per_expert && w.name.as_deref().is_some_and(|n| n.contains("{e}")) {
                return self.fail(
                    op,
                    format!(
                        "weight `{}` is not per expert; its name cannot contain `{{e}}`",
                        w.key
                    ),
                );
            }
            w.shape = Some(shape);
            w.experts = per_expert.then_some(ExpertLayout {
                interleaved: layout.interleaved && w.key.starts_with("gate_up"),
                ..layout
            });
        }
        Ok(())
    }

    /// The IR of a skipped conditional op: an identity of the input's width.
    fn disabled_op(&self, op: &OpDecl, width: usize) -> NodeOp {
        match op.kind {
            OpKind::Scale => NodeOp::Scale(ScaleAttrs { factor: 1.0 }),
            OpKind::Softcap => NodeOp::Softcap(SoftcapAttrs { cap: 0.0 }),
            OpKind::RmsNorm => NodeOp::RmsNorm(RmsNormAttrs {
                width,
                group: width,
                eps: 0.0,
                offset: 0.0,
            }),
            OpKind::Linear => NodeOp::Linear(LinearAttrs {
                in_features: width,
                out_features: width,
            }),
            kind => NodeOp::Composite(kind, CompositeAttrs::default()),
        }
    }
}

fn to_attr_value(v: &Value) -> Result<crate::ir::AttrValue, String> {
    use crate::ir::AttrValue as A;
    Ok(match v {
        Value::Null => A::List(Vec::new()),
        Value::Bool(b) => A::Bool(*b),
        Value::Int(i) => A::Int(*i),
        Value::Float(f) => A::Float(*f),
        Value::Str(s) => A::Str(s.clone()),
        Value::List(items) => A::List(items.iter().map(to_attr_value).collect::<Result<_, _>>()?),
        Value::Object(o) => A::Str(serde_json::Value::Object(o.clone()).to_string()),
    })
}

/// Reads a Hugging Face `rope_scaling` / `rope_parameters` object.
pub fn parse_rope_scaling(v: &Value) -> Result<RopeScaling, String> {
    let Value::Object(obj) = v else {
        return Err(format!("rope scaling must be an object or null, found {v}"));
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        obj.get(key)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope scaling `{kind}` needs a number `{key}`"))
    };
    let num_or = |key: &str, d: f64| obj.get(key).and_then(|x| x.as_f64()).unwrap_or(d);
    let list = |key: &str| -> Result<Vec<f64>, String> {
        obj.get(key)
            .and_then(|x| x.as_array())
            .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| format!("rope scaling `{kind}` needs a list of numbers `{key}`"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
        },
        "yarn" => RopeScaling::Yarn {
            factor: num("factor")?,
            original_max_position: num("original_max_position_embeddings")?,
            beta_fast: num_or("beta_fast", 32.0),
            beta_slow: num_or("beta_slow", 1.0),
            mscale: num_or("mscale", 1.0),
            mscale_all_dim: num_or("mscale_all_dim", 0.0),
            truncate: obj.get("truncate").and_then(|t| t.as_bool()).unwrap_or(true),
            attention_factor: obj.get("attention_factor").and_then(|x| x.as_f64()),
        },
        "longrope" | "su" => RopeScaling::LongRope {
            short_factor: list("short_factor")?,
            long_factor: list("long_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
            max_position: match obj.get("factor").and_then(|x| x.as_f64()) {
                Some(factor) => factor * num("original_max_position_embeddings")?,
                None => num_or("max_position_embeddings", 0.0),
            },
            attention_factor: obj.get("attention_factor").and_then(|x| x.as_f64()),
        },
        other => {
            return Err(format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3, yarn, longrope)"
            ))
        }
    })
}
