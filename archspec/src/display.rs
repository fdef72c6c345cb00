//! Canonical text form of the IR (`pie spec show`): byte-identical across
//! runs, diffable, with runs of identical layers folded together.

use std::fmt::{self, Write};

use crate::ir::*;

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "arch {} ({})", self.arch, self.spec_path)?;
        writeln!(f, "params")?;
        for (name, value) in &self.params {
            writeln!(f, "  {name} = {value}")?;
        }
        writeln!(f, "prologue")?;
        for n in &self.prologue {
            writeln!(f, "  {}", node_line(n))?;
        }
        let mut i = 0;
        while i < self.layers.len() {
            let body: Vec<String> = self.layers[i].nodes.iter().map(node_line).collect();
            let mut j = i + 1;
            while j < self.layers.len()
                && self.layers[j].block_index == self.layers[i].block_index
                && self.layers[j]
                    .nodes
                    .iter()
                    .map(node_line)
                    .eq(body.iter().cloned())
            {
                j += 1;
            }
            let range = if j - i == 1 {
                format!("layer {i}")
            } else {
                format!("layers {i}..={}", j - 1)
            };
            writeln!(f, "{range}: {}", self.layers[i].block)?;
            for line in &body {
                writeln!(f, "  {line}")?;
            }
            i = j;
        }
        writeln!(f, "epilogue")?;
        for n in &self.epilogue {
            writeln!(f, "  {}", node_line(n))?;
        }
        write!(f, "kv slots: {}", self.kv_slots.len())?;
        if let Some(s) = self.kv_slots.first() {
            let same = self.kv_slots.iter().all(|k| {
                (k.kv_heads, k.head_dim, k.v_head_dim) == (s.kv_heads, s.head_dim, s.v_head_dim)
            });
            if same {
                write!(
                    f,
                    " × (kv_heads={}, head_dim={}, v_head_dim={})",
                    s.kv_heads, s.head_dim, s.v_head_dim
                )?;
            } else {
                write!(f, " (mixed shapes)")?;
            }
        }
        writeln!(f)
    }
}

/// One node as `out[width] = op(inputs) attrs weights`; the layer index in
/// weight names stays `{i}` so identical layers print identically.
fn node_line(n: &Node) -> String {
    let mut s = String::new();
    let outs: Vec<String> = n
        .outputs
        .iter()
        .zip(&n.out_widths)
        .map(|(o, w)| format!("{o}[{w}]"))
        .collect();
    let _ = write!(
        s,
        "{} = {}({})",
        outs.join(", "),
        n.kind(),
        n.inputs.join(", ")
    );
    if !n.enabled {
        s.push_str(" skipped");
        return s;
    }
    let attrs = attrs_text(&n.op);
    if !attrs.is_empty() {
        let _ = write!(s, " {attrs}");
    }
    for w in &n.weights {
        if let Some(t) = &w.template {
            let _ = write!(s, " {}={t}", w.key);
            if let Some(e) = &w.experts {
                // One expert's shape as computed with, `count` times.
                let _ = write!(s, "[{}×]", e.count);
            }
            if let Some(shape) = &w.shape {
                let _ = write!(s, "{shape:?}");
            }
        }
    }
    s
}

/// Shortest text that reads back as the same number (f32 attributes are
/// printed as f32 so `1e-6` stays `0.000001`).
fn float(x: impl Into<f64> + std::fmt::Display) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

fn attrs_text(op: &NodeOp) -> String {
    match op {
        NodeOp::Embedding(a) => format!("vocab={} hidden={}", a.vocab, a.hidden),
        NodeOp::Linear(a) => format!("{}->{}", a.in_features, a.out_features),
        NodeOp::RmsNorm(a) => format!(
            "eps={} offset={} group={}",
            float(a.eps),
            float(a.offset),
            a.group
        ),
        NodeOp::Rope(a) => {
            let mut s = format!(
                "heads={} head_dim={} rotary_dim={} theta={} style={:?}",
                a.heads,
                a.head_dim,
                a.rotary_dim,
                float(a.theta),
                a.style
            );
            if a.scaling != RopeScaling::None {
                let _ = write!(s, " scaling={:?}", a.scaling);
            }
            s
        }
        NodeOp::Attention(a) => {
            let mut s = format!(
                "heads={} kv_heads={} head_dim={} v_head_dim={} scale={}",
                a.heads,
                a.kv_heads,
                a.head_dim,
                a.v_head_dim,
                float(a.scale)
            );
            if let Some(w) = a.window {
                let _ = write!(s, " window={w}");
            }
            if let Some(c) = a.softcap {
                let _ = write!(s, " softcap={}", float(c));
            }
            if let Some(l) = a.kv_from {
                let _ = write!(s, " kv_from={l}");
            }
            s
        }
        NodeOp::Add(_) | NodeOp::Mul(_) => String::new(),
        NodeOp::Scale(a) => format!("factor={}", float(a.factor)),
        NodeOp::Glu(a) => {
            let mut s = format!("act={}", a.func.spec_name());
            if let Some(l) = a.limit {
                let _ = write!(s, " limit={}", float(l));
            }
            s
        }
        NodeOp::Activation(a) => format!("fn={}", a.func.spec_name()),
        NodeOp::Softcap(a) => format!("cap={}", float(a.cap)),
        NodeOp::LayerNorm(a) => format!("eps={}", float(a.eps)),
        NodeOp::Split(a) => format!("sizes={:?} group={}", a.sizes, a.group),
        NodeOp::Concat(a) => format!("widths={:?}", a.widths),
        NodeOp::Mix(a) => format!(
            "streams={}->{} width={} offset={}",
            a.streams,
            a.out_streams,
            a.width,
            float(a.offset)
        ),
        NodeOp::Rms(a) => format!("group={}", a.group),
        NodeOp::GaussianTopk(a) => format!(
            "sparsity={} z={}",
            float(a.sparsity),
            float(a.std_multiplier)
        ),
        // The cache slots follow from execution order; printing them would
        // keep identical layers from folding together.
        NodeOp::Composite(_, a) => a
            .attrs
            .iter()
            .filter(|(k, _)| k != "cache_slot" && k != "index_slot")
            .map(|(k, v)| format!("{k}={}", attr_value(v)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn attr_value(v: &AttrValue) -> String {
    match v {
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Float(x) => float(*x),
        AttrValue::Bool(b) => b.to_string(),
        AttrValue::Str(s) => format!("{s:?}"),
        AttrValue::List(items) => format!(
            "[{}]",
            items.iter().map(attr_value).collect::<Vec<_>>().join(", ")
        ),
    }
}
