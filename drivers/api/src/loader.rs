//! Support code for generated model loaders: fetches each weight once
//! (tied weights share one copy), checks its shape, and pulls each node's
//! attributes out of the IR with a clear error if code and IR disagree.

use std::collections::HashMap;
use std::sync::Arc;

use pie_archspec::ir::{ExpertLayout, Node, NodeOp, WeightBinding};

use crate::{Driver, DriverError, Result, TensorView, WeightRole, WeightSource};

pub struct WeightStore<'a, D: Driver> {
    driver: &'a D,
    source: &'a dyn WeightSource,
    loaded: HashMap<String, Arc<D::Weight>>,
    /// Called after each tensor is loaded (progress display).
    on_load: Option<&'a dyn Fn(&str)>,
    /// Every matrix loaded so far was stored as f32 in the checkpoint.
    f32_matrices: bool,
}

impl<'a, D: Driver> WeightStore<'a, D> {
    pub fn new(driver: &'a D, source: &'a dyn WeightSource) -> Self {
        WeightStore {
            driver,
            source,
            loaded: HashMap::new(),
            on_load: None,
            f32_matrices: true,
        }
    }

    pub fn with_progress(mut self, on_load: &'a dyn Fn(&str)) -> Self {
        self.on_load = Some(on_load);
        self
    }

    /// Whether every weight matrix (experts included) loaded so far was
    /// stored as f32: drivers pick a narrower KV cache for checkpoints that
    /// are themselves narrower (see [`Driver::resolve_kv_dtype`]).
    pub fn f32_matrices(&self) -> bool {
        self.f32_matrices
    }

    fn note_matrix(&mut self, dtype: crate::DType) {
        self.f32_matrices &= dtype == crate::DType::F32;
    }

    /// The weight `key` of `node`; None when the spec made it absent.
    pub fn optional(&mut self, node: &Node, key: &str) -> Result<Option<Arc<D::Weight>>> {
        let Some(binding) = node.weight(key) else {
            return Ok(None);
        };
        let Some(name) = &binding.name else {
            return Ok(None);
        };
        if let Some(w) = self.loaded.get(name) {
            return Ok(Some(w.clone()));
        }
        if let Some(layout) = binding.experts {
            let w = Arc::new(self.load_experts(name, binding, layout)?);
            self.loaded.insert(name.clone(), w.clone());
            return Ok(Some(w));
        }
        let view = self.source.tensor(name).map_err(DriverError::Invalid)?;
        let shape = expected_shape(binding, view.shape);
        let role = if shape.len() == 1 {
            WeightRole::Vector
        } else {
            self.note_matrix(view.dtype);
            WeightRole::Matrix
        };
        let w = Arc::new(self.driver.load_weight(name, &view, &shape, role)?);
        self.source.release(name);
        if let Some(cb) = self.on_load {
            cb(name);
        }
        self.loaded.insert(name.clone(), w.clone());
        Ok(Some(w))
    }

    /// Loads the matrices `key` of `nodes` (a fused call's q/k/v or gate/up)
    /// with [`Driver::load_weights_together`], so a driver can place them
    /// side by side; [`WeightStore::required`] then finds them loaded.
    /// Matrices that are absent, tied to one already loaded, per-expert or
    /// named twice are left to the ordinary one-by-one load.
    pub fn load_together(&mut self, nodes: &[&Node], key: &str) -> Result<()> {
        let mut names: Vec<&str> = Vec::with_capacity(nodes.len());
        let mut shapes = Vec::with_capacity(nodes.len());
        for node in nodes {
            let Some(binding) = node.weight(key) else {
                return Ok(());
            };
            let Some(name) = binding.name.as_deref() else {
                return Ok(());
            };
            if binding.experts.is_some() || self.loaded.contains_key(name) || names.contains(&name)
            {
                return Ok(());
            }
            names.push(name);
            shapes.push(binding.shape.clone());
        }
        let views = names
            .iter()
            .map(|name| self.source.tensor(name).map_err(DriverError::Invalid))
            .collect::<Result<Vec<_>>>()?;
        let expected: Vec<Vec<usize>> = shapes
            .into_iter()
            .zip(&views)
            .map(|(shape, view)| shape.unwrap_or_else(|| view.shape.to_vec()))
            .collect();
        if expected.iter().any(|s| s.len() != 2) {
            return Ok(());
        }
        let parts: Vec<crate::WeightPart<'_>> = names
            .iter()
            .zip(views)
            .zip(&expected)
            .map(|((name, view), expected)| crate::WeightPart {
                name,
                view,
                expected,
            })
            .collect();
        let dtypes: Vec<crate::DType> = parts.iter().map(|p| p.view.dtype).collect();
        let weights = self.driver.load_weights_together(&parts)?;
        drop(parts);
        for ((name, w), dtype) in names.iter().zip(weights).zip(dtypes) {
            self.note_matrix(dtype);
            self.source.release(name);
            if let Some(cb) = self.on_load {
                cb(name);
            }
            self.loaded.insert(name.to_string(), Arc::new(w));
        }
        Ok(())
    }

    /// One weight per expert, from one tensor per expert (`{e}` in `name`)
    /// or one stacked tensor, handed to the driver as a stacked view.
    fn load_experts(
        &mut self,
        name: &str,
        binding: &WeightBinding,
        layout: ExpertLayout,
    ) -> Result<D::Weight> {
        let mut one = binding.shape.clone().unwrap_or_default();
        if layout.transposed && one.len() == 2 {
            one.swap(0, 1);
        }
        let stacked: Vec<usize> = std::iter::once(layout.count)
            .chain(one.iter().copied())
            .collect();
        let role = WeightRole::Experts(layout);
        let w = if name.contains("{e}") {
            let mut data = Vec::new();
            let mut dtype = None;
            for e in 0..layout.count {
                let expert = name.replace("{e}", &e.to_string());
                let view = self.source.tensor(&expert).map_err(DriverError::Invalid)?;
                if view.shape != one.as_slice() {
                    return Err(DriverError::Shape {
                        name: expert,
                        expected: one,
                        found: view.shape.to_vec(),
                    });
                }
                if dtype.is_some_and(|d| d != view.dtype) {
                    return Err(DriverError::Invalid(format!(
                        "tensor `{expert}` is {} but expert 0 is {}",
                        view.dtype,
                        dtype.unwrap_or(view.dtype)
                    )));
                }
                dtype = Some(view.dtype);
                data.extend_from_slice(view.data);
                self.source.release(&expert);
            }
            self.note_matrix(dtype.unwrap_or(crate::DType::F32));
            let view = TensorView {
                dtype: dtype.unwrap_or(crate::DType::F32),
                shape: &stacked,
                data: &data,
            };
            self.driver.load_weight(name, &view, &stacked, role)?
        } else {
            let view = self.source.tensor(name).map_err(DriverError::Invalid)?;
            self.note_matrix(view.dtype);
            let w = self.driver.load_weight(name, &view, &stacked, role)?;
            self.source.release(name);
            w
        };
        if let Some(cb) = self.on_load {
            cb(name);
        }
        Ok(w)
    }

    /// The weight `key` of `node`, which the spec says must exist.
    pub fn required(&mut self, node: &Node, key: &str) -> Result<Arc<D::Weight>> {
        self.optional(node, key)?.ok_or_else(|| {
            DriverError::Invalid(format!(
                "{}: op `{}` needs weight `{key}`, but the spec left it out for this config",
                node.origin,
                node.kind()
            ))
        })
    }
}

/// The shape the op requires, or the file's shape where the op leaves it
/// open (composite ops check their own).
fn expected_shape(binding: &WeightBinding, found: &[usize]) -> Vec<usize> {
    binding.shape.clone().unwrap_or_else(|| found.to_vec())
}

/// Unwraps a conditional op's weight inside its enabled branch.
pub fn present<W>(w: &Option<Arc<W>>, what: &str) -> Result<Arc<W>> {
    w.clone()
        .ok_or_else(|| DriverError::Invalid(format!("weight `{what}` was not loaded")))
}

/// The next output of a `split`.
pub fn next_part<A>(parts: &mut std::vec::IntoIter<A>) -> Result<A> {
    parts
        .next()
        .ok_or_else(|| DriverError::Invalid("split produced fewer parts than declared".into()))
}

/// Error for generated code meeting an IR node of another kind.
pub fn mismatch(node: &Node, expected: &str) -> DriverError {
    DriverError::Invalid(format!(
        "{}: generated code expects `{expected}` but the IR has `{}` (rebuild after changing the spec)",
        node.origin,
        node.kind()
    ))
}

/// Attribute extractors used by generated loaders, one per IR op.
macro_rules! attrs_getter {
    ($fn:ident, $variant:ident, $ty:ty, $name:literal) => {
        pub fn $fn(node: &Node) -> Result<$ty> {
            match &node.op {
                NodeOp::$variant(a) => Ok(a.clone()),
                _ => Err(mismatch(node, $name)),
            }
        }
    };
}

use pie_archspec::ir;
attrs_getter!(embedding_attrs, Embedding, ir::EmbeddingAttrs, "embedding");
attrs_getter!(linear_attrs, Linear, ir::LinearAttrs, "linear");
attrs_getter!(rms_norm_attrs, RmsNorm, ir::RmsNormAttrs, "rms_norm");
attrs_getter!(rope_attrs, Rope, ir::RopeAttrs, "rope");
attrs_getter!(attention_attrs, Attention, ir::AttentionAttrs, "attention");
attrs_getter!(add_attrs, Add, ir::ElementwiseAttrs, "add");
attrs_getter!(mul_attrs, Mul, ir::ElementwiseAttrs, "mul");
attrs_getter!(scale_attrs, Scale, ir::ScaleAttrs, "scale");
attrs_getter!(glu_attrs, Glu, ir::GluAttrs, "glu");
attrs_getter!(
    activation_attrs,
    Activation,
    ir::ActivationAttrs,
    "activation"
);
attrs_getter!(softcap_attrs, Softcap, ir::SoftcapAttrs, "softcap");
attrs_getter!(
    layer_norm_attrs,
    LayerNorm,
    ir::LayerNormAttrs,
    "layer_norm"
);
attrs_getter!(split_attrs, Split, ir::SplitAttrs, "split");
attrs_getter!(concat_attrs, Concat, ir::ConcatAttrs, "concat");
attrs_getter!(mix_attrs, Mix, ir::MixAttrs, "mix");
attrs_getter!(rms_attrs, Rms, ir::RmsAttrs, "rms");
attrs_getter!(
    gaussian_topk_attrs,
    GaussianTopk,
    ir::GaussianTopkAttrs,
    "gaussian_topk"
);

pub fn composite_attrs(node: &Node, kind: ir::OpKind) -> Result<ir::CompositeAttrs> {
    match &node.op {
        NodeOp::Composite(k, a) if *k == kind => Ok(a.clone()),
        _ => Err(mismatch(node, kind.spec_name())),
    }
}

/// The node at `index` of a section, or an error if the IR is shorter than
/// the generated code expects.
pub fn node<'n>(nodes: &'n [Node], index: usize, section: &str) -> Result<&'n Node> {
    nodes.get(index).ok_or_else(|| {
        DriverError::Invalid(format!(
            "{section}: generated code expects op #{index}, the IR has {} ops (rebuild after changing the spec)",
            nodes.len()
        ))
    })
}
