//! Checks a parsed spec needs no config for: known names in expressions,
//! parameter cycles, activations defined before use, the residual stream
//! flowing through every section.

use std::collections::{BTreeSet, HashMap};

use crate::diagnostic::Diagnostic;
use crate::expr::did_you_mean;
use crate::spec::{AttrValue, OpDecl, ParamSource, Section, Spec, SpecExpr};

/// Parameters every spec must define.
pub const REQUIRED_PARAMS: [&str; 3] = ["hidden", "layers", "vocab"];
/// The residual stream carried from section to section.
pub const STREAM: &str = "x";
pub const LOGITS: &str = "logits";
/// The layer index, visible in `[[layer]]` blocks.
pub const LAYER_INDEX: &str = "i";

pub fn validate(spec: &Spec) -> Vec<Diagnostic> {
    let mut v = Validator {
        spec,
        errors: Vec::new(),
        params: spec.params.iter().map(|p| p.name.as_str()).collect(),
    };
    v.required_params();
    v.param_exprs();
    for check in &spec.checks {
        v.expr(&check.expr, false);
    }
    v.section(&spec.prologue, false, &[], &[STREAM]);
    let mut names = BTreeSet::new();
    for layer in &spec.layers {
        if !names.insert(layer.name.as_str()) {
            v.error(
                layer.span.clone(),
                format!("two [[layer]] blocks are named `{}`", layer.name),
                "",
            );
        }
        if !crate::spec::is_ident(&layer.name) {
            v.error(
                layer.span.clone(),
                format!("layer block name `{}` is not an identifier", layer.name),
                "use lowercase letters, digits and _",
            );
        }
        if let Some(when) = &layer.when {
            v.expr(when, true);
        }
        v.section(layer, true, &[STREAM], &[STREAM]);
    }
    if spec.layers.len() > 1 && spec.layers.iter().any(|l| l.when.is_none()) {
        v.error(
            spec.layers[0].span.clone(),
            "with several [[layer]] blocks, each needs `when`",
            "e.g. when = \"layer_types[i] == 'sliding_attention'\"",
        );
    }
    v.section(&spec.epilogue, false, &[STREAM], &[LOGITS]);
    v.epilogue_is_row_local();
    v.errors
}

struct Validator<'a> {
    spec: &'a Spec,
    errors: Vec<Diagnostic>,
    params: BTreeSet<&'a str>,
}

impl<'a> Validator<'a> {
    fn error(
        &mut self,
        span: std::ops::Range<usize>,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let d = self.spec.source.diagnostic(span, msg).with_hint(hint);
        self.errors.push(d);
    }

    /// Drivers run the epilogue on just the rows whose logits are wanted, so
    /// its ops may not mix tokens or depend on positions.
    fn epilogue_is_row_local(&mut self) {
        use crate::ir::OpKind;
        for op in &self.spec.epilogue.ops {
            let mixes = matches!(
                op.kind,
                OpKind::Attention
                    | OpKind::Rope
                    | OpKind::MlaAttention
                    | OpKind::GatedDeltaNet
                    | OpKind::Mamba2
            );
            if mixes {
                self.error(
                    op.span.clone(),
                    format!("op `{}` cannot be in the epilogue", op.kind),
                    "the epilogue runs only on the rows whose logits are wanted; put sequence ops in a [[layer]] block",
                );
            }
        }
    }

    fn required_params(&mut self) {
        for name in REQUIRED_PARAMS {
            if !self.params.contains(name) {
                self.error(
                    0..0,
                    format!("[params] must define `{name}`"),
                    "every spec defines hidden, layers and vocab",
                );
            }
        }
    }

    /// Names in parameter expressions exist, and no parameter depends on itself.
    fn param_exprs(&mut self) {
        let mut deps: HashMap<&str, Vec<&str>> = HashMap::new();
        for p in &self.spec.params {
            let e = match &p.source {
                ParamSource::Config {
                    default: Some(e), ..
                }
                | ParamSource::Derived(e) => e,
                ParamSource::Config { default: None, .. } => continue,
            };
            self.expr(e, false);
            deps.insert(
                &p.name,
                e.expr.names().into_iter().map(|(n, _)| n).collect(),
            );
        }
        for p in &self.spec.params {
            let mut stack = vec![p.name.as_str()];
            let mut seen = BTreeSet::new();
            while let Some(n) = stack.pop() {
                for d in deps.get(n).into_iter().flatten() {
                    if *d == p.name {
                        self.error(
                            p.span.clone(),
                            format!("parameter `{}` depends on itself", p.name),
                            "break the cycle between its default/expr and the parameters it uses",
                        );
                        stack.clear();
                        break;
                    }
                    if seen.insert(*d) {
                        stack.push(d);
                    }
                }
            }
        }
    }

    fn expr(&mut self, e: &SpecExpr, in_layer: bool) {
        for (name, offset) in e.expr.names() {
            let known = self.params.contains(name) || (in_layer && name == LAYER_INDEX);
            if !known {
                let at = e.text_start + offset;
                let mut candidates: Vec<&str> = self.params.iter().copied().collect();
                if in_layer {
                    candidates.push(LAYER_INDEX);
                }
                let hint = if name == LAYER_INDEX {
                    "the layer index `i` exists only inside [[layer]] blocks".to_string()
                } else {
                    "define it in [params]".to_string()
                };
                self.error(
                    at..at + name.len(),
                    format!(
                        "unknown parameter `{name}`{}",
                        did_you_mean(name, candidates)
                    ),
                    hint,
                );
            }
        }
    }

    fn section(&mut self, s: &Section, in_layer: bool, live_in: &[&str], must_define: &[&str]) {
        let mut live: BTreeSet<String> = live_in.iter().map(|s| s.to_string()).collect();
        for op in &s.ops {
            self.op(op, in_layer, &live);
            for out in &op.outputs {
                live.insert(out.value.clone());
            }
        }
        for name in must_define {
            let written = s
                .ops
                .iter()
                .any(|op| op.outputs.iter().any(|o| o.value == *name));
            if !written {
                self.error(
                    s.span.clone(),
                    format!("{} never writes `{name}`", describe(s)),
                    if *name == LOGITS {
                        "the epilogue must end by writing `logits`"
                    } else {
                        "the residual stream `x` must be written by the prologue and by every layer block"
                    },
                );
            }
        }
    }

    fn op(&mut self, op: &OpDecl, in_layer: bool, live: &BTreeSet<String>) {
        for (_, names) in &op.inputs {
            for n in names {
                if !live.contains(&n.value) {
                    let known: Vec<&str> = live.iter().map(String::as_str).collect();
                    self.error(
                        n.span.clone(),
                        format!(
                            "op `{}` reads `{}`, which no earlier op writes{}",
                            op.kind,
                            n.value,
                            did_you_mean(&n.value, known.iter().copied())
                        ),
                        format!("defined here: {}", known.join(", ")),
                    );
                }
            }
        }
        if let Some(cond) = &op.cond {
            self.expr(cond, in_layer);
            let ins = op.input("in");
            let same =
                ins.len() == 1 && op.outputs.len() == 1 && ins[0].value == op.outputs[0].value;
            if !same {
                self.error(
                    cond.span.clone(),
                    format!("a conditional `{}` must write the activation it reads", op.kind),
                    "with `if`, use the same name for `in` and `out` so the value exists either way",
                );
            }
        }
        for (_, attr) in &op.attrs {
            match attr {
                AttrValue::Expr(e) => self.expr(e, in_layer),
                AttrValue::List(items) => items.iter().for_each(|e| self.expr(e, in_layer)),
                AttrValue::Name(_) => {}
            }
        }
        for (_, w) in &op.weights {
            if w.name.value.is_empty() {
                self.error(w.name.span.clone(), "empty weight name", "");
            }
            for e in [&w.cond, &w.tied_if].into_iter().flatten() {
                self.expr(e, in_layer);
            }
        }
    }
}

fn describe(s: &Section) -> String {
    match s.name.as_str() {
        "prologue" | "epilogue" => format!("the {}", s.name),
        name => format!("layer block `{name}`"),
    }
}
