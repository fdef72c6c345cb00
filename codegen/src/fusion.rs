//! Which ops of a section run as one fused driver call.
//!
//! The forward is straight-line code over named activations, so fusing is
//! a matter of finding op patterns whose intermediate results nobody else
//! reads. Each fused call has a default in the `Driver` trait that runs the
//! ops one by one; drivers with a kernel for it (CUDA) save launches and
//! round trips through memory. Conditional ops are never fused: their
//! `None` branch passes the input through, which a fused call cannot.

use pie_archspec::ir::OpKind;
use pie_archspec::spec::OpDecl;

/// One call of a section's forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An op on its own.
    Op(usize),
    /// Two or more `linear` ops on the same input (q/k/v projections).
    LinearMany(Vec<usize>),
    /// `linear` gate, `linear` up (same input), `glu` of the two.
    GatedLinear { gate: usize, up: usize, glu: usize },
    /// `add` and the `rms_norm` of its sum right after it.
    AddRmsNorm { add: usize, norm: usize },
    /// An `rms_norm` whose only reader is a later `rope`, run at the rope.
    RmsNormRope { norm: usize, rope: usize },
    /// Two back-to-back [`Step::RmsNormRope`]s on independent inputs
    /// (queries and keys): one call.
    RmsNormRope2 {
        first: (usize, usize),
        second: (usize, usize),
    },
    /// A [`Step::RmsNormRope2`] whose two results only the `attention`
    /// right after it reads, as its queries and keys: the driver may apply
    /// the norms and rotation inside the attention kernel.
    NormRopeAttention {
        first: (usize, usize),
        second: (usize, usize),
        attention: usize,
    },
    /// `linear` whose output only the next op, an `add` rebinding the other
    /// operand (the residual), reads: the residual moves into the call.
    LinearAdd { linear: usize, add: usize },
    /// An `rms_norm` whose output only the [`Step::LinearMany`] right
    /// after it reads (a layer's input norm and q/k/v).
    NormLinearMany { norm: usize, group: Vec<usize> },
    /// A [`Step::AddRmsNorm`] whose normed output only the
    /// [`Step::GatedLinear`] right after it reads (post-attention norm and
    /// the MLP's gate/up).
    AddNormGatedLinear {
        add: usize,
        norm: usize,
        gate: usize,
        up: usize,
        glu: usize,
    },
    /// An [`Step::AddNormGatedLinear`] whose GLU output only the
    /// [`Step::LinearAdd`] right after it reads, adding the down projection
    /// into the sum: a pre-norm block's whole MLP half. The add's second
    /// operand is read nowhere after it (it moves into the call).
    AddNormMlp {
        add: usize,
        norm: usize,
        gate: usize,
        up: usize,
        glu: usize,
        down: usize,
        add_down: usize,
    },
}

/// The calls that run `ops` in order; `result` is the activation the
/// section returns (so it is live at the end).
pub fn plan(ops: &[OpDecl], result: &str) -> Vec<Step> {
    let deferred = norms_before_rope(ops, result);
    let mut steps = Vec::new();
    // The ops still to place: deferred norms move to their rope.
    let order: Vec<usize> = (0..ops.len())
        .filter(|i| !deferred.iter().any(|&(norm, _)| norm == *i))
        .collect();
    let mut at = 0;
    while at < order.len() {
        let i = order[at];
        if let Some(&(norm, _)) = deferred.iter().find(|&&(_, rope)| rope == i) {
            steps.push(Step::RmsNormRope { norm, rope: i });
            at += 1;
            continue;
        }
        let rest = &order[at..];
        if let Some(step) = gated_linear(ops, rest, result) {
            steps.push(step);
            at += 3;
        } else if let Some(group) = linear_group(ops, rest) {
            at += group.len();
            steps.push(Step::LinearMany(group));
        } else if let Some(step) = add_rms_norm(ops, rest) {
            steps.push(step);
            at += 2;
        } else if let Some(step) = linear_add(ops, rest, result) {
            steps.push(step);
            at += 2;
        } else {
            steps.push(Step::Op(i));
            at += 1;
        }
    }
    let steps = norms_into_products(ops, pair_norm_ropes(ops, steps), result);
    let steps = mlps_joined(ops, steps, result);
    norm_ropes_into_attention(ops, steps, result)
}

/// Merges an [`Step::AddNormGatedLinear`] and the [`Step::LinearAdd`]
/// after it into [`Step::AddNormMlp`] where the down projection reads the
/// GLU output (read nowhere else) and adds into the sum, and the add's
/// second operand dies at the add.
fn mlps_joined(ops: &[OpDecl], steps: Vec<Step>, result: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        if let (
            Some(&Step::AddNormGatedLinear {
                add,
                norm,
                gate,
                up,
                glu,
            }),
            &Step::LinearAdd {
                linear,
                add: add_down,
            },
        ) = (out.last(), &step)
        {
            if mlp_wired(ops, add, glu, linear, add_down, result) {
                *out.last_mut().expect("matched above") = Step::AddNormMlp {
                    add,
                    norm,
                    gate,
                    up,
                    glu,
                    down: linear,
                    add_down,
                };
                continue;
            }
        }
        out.push(step);
    }
    out
}

/// Whether the down projection `linear` reads the GLU's output and
/// nothing after it does, `add_down` adds into the sum of `add`, and the
/// second operand of `add` is distinct from the first and dead after it.
fn mlp_wired(
    ops: &[OpDecl],
    add: usize,
    glu: usize,
    linear: usize,
    add_down: usize,
    result: &str,
) -> bool {
    let m = output(&ops[glu]);
    let private = output(&ops[linear]) == m || !read_after(ops, linear, m, result);
    let sum = output(&ops[add]);
    // The residual add_down adds the product into: the operand that is
    // not the product (a product reusing the sum's name is no residual).
    let product = output(&ops[linear]);
    let residual = match (
        input(&ops[add_down], "in", 0),
        input(&ops[add_down], "in", 1),
    ) {
        (Some(r), Some(o)) | (Some(o), Some(r)) if o == product && r != product => Some(r),
        _ => None,
    };
    let into_sum = residual == Some(sum);
    let (Some(x), Some(y)) = (input(&ops[add], "in", 0), input(&ops[add], "in", 1)) else {
        return false;
    };
    let y_dies = x != y && (sum == y || !read_after(ops, add, y, result));
    input(&ops[linear], "in", 0) == Some(m) && private && into_sum && y_dies
}

/// Merges a [`Step::RmsNormRope2`] into the attention right after it
/// where that attention alone reads both results, as `q` and `k` (with a
/// `v` of its own: not a layer reading another's cache).
fn norm_ropes_into_attention(ops: &[OpDecl], steps: Vec<Step>, result: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        if let (Some(&Step::RmsNormRope2 { first, second }), &Step::Op(att)) = (out.last(), &step) {
            let attention = &ops[att];
            let (q, k) = (output(&ops[first.1]), output(&ops[second.1]));
            let wired = fusable(attention, OpKind::Attention)
                && input(attention, "q", 0) == Some(q)
                && input(attention, "k", 0) == Some(k)
                && input(attention, "v", 0).is_some_and(|v| v != q && v != k);
            let private = [q, k]
                .iter()
                .all(|name| output(attention) == *name || !read_after(ops, att, name, result));
            if wired && private {
                *out.last_mut().expect("matched above") = Step::NormRopeAttention {
                    first,
                    second,
                    attention: att,
                };
                continue;
            }
        }
        out.push(step);
    }
    out
}

/// Moves a norm into the products after it where they alone read the
/// normed activation ([`Step::NormLinearMany`], [`Step::AddNormGatedLinear`]).
fn norms_into_products(ops: &[OpDecl], steps: Vec<Step>, result: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        let merged = match (out.last(), &step) {
            (Some(&Step::Op(norm)), Step::LinearMany(group))
                if fusable(&ops[norm], OpKind::RmsNorm)
                    && group
                        .last()
                        .is_some_and(|&last| feeds_only(ops, norm, group[0], last, result)) =>
            {
                Some(Step::NormLinearMany {
                    norm,
                    group: group.clone(),
                })
            }
            (Some(&Step::AddRmsNorm { add, norm }), &Step::GatedLinear { gate, up, glu })
                if feeds_only(ops, norm, gate, glu, result) =>
            {
                Some(Step::AddNormGatedLinear {
                    add,
                    norm,
                    gate,
                    up,
                    glu,
                })
            }
            _ => None,
        };
        match merged {
            Some(m) => *out.last_mut().expect("matched above") = m,
            None => out.push(step),
        }
    }
    out
}

/// Whether the output of op `norm` is the input of op `first` and read by
/// nothing after op `last` (the steps from `first` to `last` read it).
fn feeds_only(ops: &[OpDecl], norm: usize, first: usize, last: usize, result: &str) -> bool {
    let normed = output(&ops[norm]);
    input(&ops[first], "in", 0) == Some(normed)
        && input(&ops[norm], "in", 0) != Some(normed)
        && !read_after(ops, last, normed, result)
}

/// Merges adjacent norm + rope steps where the second does not read what
/// the first wrote.
fn pair_norm_ropes(ops: &[OpDecl], steps: Vec<Step>) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        if let (Some(Step::RmsNormRope { norm, rope }), Step::RmsNormRope { norm: n2, rope: r2 }) =
            (out.last(), &step)
        {
            let (first, written) = ((*norm, *rope), output(&ops[*rope]));
            if input(&ops[*n2], "in", 0) != Some(written) && output(&ops[*r2]) != written {
                *out.last_mut().expect("checked above") = Step::RmsNormRope2 {
                    first,
                    second: (*n2, *r2),
                };
                continue;
            }
        }
        out.push(step);
    }
    out
}

fn fusable(op: &OpDecl, kind: OpKind) -> bool {
    op.kind == kind && op.cond.is_none()
}

fn input<'a>(op: &'a OpDecl, key: &str, n: usize) -> Option<&'a str> {
    op.input(key).get(n).map(|s| s.value.as_str())
}

fn output(op: &OpDecl) -> &str {
    &op.outputs[0].value
}

fn reads(op: &OpDecl, name: &str) -> bool {
    op.inputs
        .iter()
        .any(|(_, names)| names.iter().any(|n| n.value == name))
}

fn writes(op: &OpDecl, name: &str) -> bool {
    op.outputs.iter().any(|o| o.value == name)
}

/// Whether `name`, as bound after op `after`, is read later: by an op
/// before one rebinds it, or as the section's result.
fn read_after(ops: &[OpDecl], after: usize, name: &str, result: &str) -> bool {
    for op in &ops[after + 1..] {
        if reads(op, name) {
            return true;
        }
        if writes(op, name) {
            return false;
        }
    }
    name == result
}

/// `(norm, rope)` pairs: a per-group `rms_norm` whose output only a later
/// `rope` reads, with nothing in between touching its input or output.
fn norms_before_rope(ops: &[OpDecl], result: &str) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (n, norm) in ops.iter().enumerate() {
        if !fusable(norm, OpKind::RmsNorm) {
            continue;
        }
        let (Some(src), out) = (input(norm, "in", 0), output(norm)) else {
            continue;
        };
        let Some(r) = (n + 1..ops.len()).find(|&j| reads(&ops[j], out) || writes(&ops[j], out))
        else {
            continue;
        };
        let rope = &ops[r];
        // The norm moves to the rope: its input must still hold the same
        // value there, and after the rope nothing may read the normed
        // activation (unless the rope rebinds its name).
        let src_kept = ops[n + 1..r].iter().all(|op| !writes(op, src));
        let normed_dead = output(rope) == out || !read_after(ops, r, out, result);
        if fusable(rope, OpKind::Rope)
            && input(rope, "in", 0) == Some(out)
            && src_kept
            && normed_dead
        {
            pairs.push((n, r));
        }
    }
    pairs
}

/// `linear g; linear u; glu(g, u)` on one input, g and u read nowhere else.
fn gated_linear(ops: &[OpDecl], rest: &[usize], result: &str) -> Option<Step> {
    let [g, u, m, ..] = *rest else { return None };
    let (gate, up, glu) = (&ops[g], &ops[u], &ops[m]);
    let linears = fusable(gate, OpKind::Linear) && fusable(up, OpKind::Linear);
    if !linears || !fusable(glu, OpKind::Glu) {
        return None;
    }
    let x = input(gate, "in", 0)?;
    let (go, uo) = (output(gate), output(up));
    let wired = input(up, "in", 0) == Some(x)
        && go != uo
        && go != x
        && uo != x
        && input(glu, "gate", 0) == Some(go)
        && input(glu, "up", 0) == Some(uo);
    let private = [go, uo]
        .iter()
        .all(|name| output(glu) == *name || !read_after(ops, m, name, result));
    (wired && private).then_some(Step::GatedLinear {
        gate: g,
        up: u,
        glu: m,
    })
}

/// The longest run (two or more) of `linear` ops reading one input, none
/// of which rebinds that input or another's output.
fn linear_group(ops: &[OpDecl], rest: &[usize]) -> Option<Vec<usize>> {
    let first = &ops[*rest.first()?];
    if !fusable(first, OpKind::Linear) {
        return None;
    }
    let x = input(first, "in", 0)?;
    let mut group: Vec<usize> = Vec::new();
    for &i in rest {
        let op = &ops[i];
        let out = output(op);
        let distinct = out != x && group.iter().all(|&j| output(&ops[j]) != out);
        if !fusable(op, OpKind::Linear) || input(op, "in", 0) != Some(x) || !distinct {
            break;
        }
        group.push(i);
    }
    (group.len() >= 2).then_some(group)
}

/// `x = add(x, linear(m))` (either operand order), where the product is
/// read nowhere else and the residual is not the product's input (it is
/// moved into the call while the input is borrowed). An add followed by a
/// norm of its sum is left to [`add_rms_norm`]: as many launches, and the
/// norm reads the sum from the same kernel.
fn linear_add(ops: &[OpDecl], rest: &[usize], result: &str) -> Option<Step> {
    let [l, a, ..] = *rest else { return None };
    let (linear, add) = (&ops[l], &ops[a]);
    if !fusable(linear, OpKind::Linear) || !fusable(add, OpKind::Add) || add.input("in").len() != 2
    {
        return None;
    }
    let (m, y, sum) = (input(linear, "in", 0)?, output(linear), output(add));
    let residual = match (input(add, "in", 0)?, input(add, "in", 1)?) {
        (r, o) | (o, r) if o == y && r != y => r,
        _ => return None,
    };
    let normed_next = rest.get(2).is_some_and(|&n| {
        fusable(&ops[n], OpKind::RmsNorm) && input(&ops[n], "in", 0) == Some(sum)
    });
    let wired = sum == residual && residual != m && !read_after(ops, a, y, result);
    (wired && !normed_next).then_some(Step::LinearAdd { linear: l, add: a })
}

/// `s = add(a, b)` immediately followed by `rms_norm(s)`.
fn add_rms_norm(ops: &[OpDecl], rest: &[usize]) -> Option<Step> {
    let [a, n, ..] = *rest else { return None };
    let (add, norm) = (&ops[a], &ops[n]);
    let wired = fusable(add, OpKind::Add)
        && fusable(norm, OpKind::RmsNorm)
        && add.input("in").len() == 2
        && input(norm, "in", 0) == Some(output(add));
    wired.then_some(Step::AddRmsNorm { add: a, norm: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fusion plan of a one-block spec whose layer runs `ops` (TOML
    /// inline tables, one per line).
    fn plan_of(ops: &str) -> Vec<Step> {
        let text = format!(
            r#"
[arch]
name = "t"
hf_model_types = ["t"]
summary = "test"

[params]
hidden = "hidden_size"
vocab = "vocab_size"
layers = "num_hidden_layers"

[prologue]
ops = [{{ op = "embedding", out = "x", weight = "e" }}]

[[layer]]
name = "block"
prefix = "l.{{i}}"
ops = [
{ops}
]

[epilogue]
ops = [{{ op = "linear", in = "x", out = "logits", features = "vocab", weight = "head" }}]
"#
        );
        let spec = pie_archspec::parse("t.toml", &text).unwrap_or_else(|d| panic!("{d}"));
        plan(&spec.layers[0].ops, "x")
    }

    const NORM_QK: &str = r#"
  { op = "rms_norm", in = "x", out = "h", weight = "n", eps = 1e-6 },
  { op = "linear", in = "h", out = "q", features = "hidden", weight = "q" },
  { op = "linear", in = "h", out = "k", features = "hidden", weight = "k" },
"#;

    /// A Qwen3 layer's attention half after [`NORM_QK`]: v, per-head q/k
    /// norms, ropes, attention into `a` (ops 3 to 8).
    const ATTENTION: &str = r#"  { op = "linear", in = "h", out = "v", features = "hidden", weight = "v" },
  { op = "rms_norm", in = "q", out = "q", weight = "qn", group = 8, eps = 1e-6 },
  { op = "rms_norm", in = "k", out = "k", weight = "kn", group = 8, eps = 1e-6 },
  { op = "rope", in = "q", out = "q", head_dim = 8, theta = 1e4 },
  { op = "rope", in = "k", out = "k", head_dim = 8, theta = 1e4 },
  { op = "attention", q = "q", k = "k", v = "v", out = "a", heads = 2, kv_heads = 2, head_dim = 8 },
"#;

    #[test]
    fn qwen3_layer_fuses_every_pattern() {
        let ops = format!(
            r#"{NORM_QK}{ATTENTION}  {{ op = "add", in = ["x", "a"], out = "x" }},
  {{ op = "rms_norm", in = "x", out = "h", weight = "n2", eps = 1e-6 }},
  {{ op = "linear", in = "h", out = "g", features = 32, weight = "g" }},
  {{ op = "linear", in = "h", out = "u", features = 32, weight = "u" }},
  {{ op = "glu", gate = "g", up = "u", out = "m", act = "silu" }},
  {{ op = "linear", in = "m", out = "m", features = "hidden", weight = "d" }},
  {{ op = "add", in = ["x", "m"], out = "x" }},"#
        );
        assert_eq!(
            plan_of(&ops),
            vec![
                Step::NormLinearMany {
                    norm: 0,
                    group: vec![1, 2, 3]
                },
                Step::NormRopeAttention {
                    first: (4, 6),
                    second: (5, 7),
                    attention: 8
                },
                Step::AddNormMlp {
                    add: 9,
                    norm: 10,
                    gate: 11,
                    up: 12,
                    glu: 13,
                    down: 14,
                    add_down: 15
                },
            ]
        );
    }

    /// The MLP half stays two calls where the attention output is read
    /// after the add (it cannot move in) or the GLU output after the down
    /// projection.
    #[test]
    fn an_mlp_whose_operands_live_on_stays_two_calls() {
        let mlp = |tail: &str| {
            format!(
                r#"  {{ op = "linear", in = "x", out = "a", features = "hidden", weight = "o" }},
  {{ op = "add", in = ["x", "a"], out = "x" }},
  {{ op = "rms_norm", in = "x", out = "h", weight = "n2", eps = 1e-6 }},
  {{ op = "linear", in = "h", out = "g", features = 32, weight = "g" }},
  {{ op = "linear", in = "h", out = "u", features = 32, weight = "u" }},
  {{ op = "glu", gate = "g", up = "u", out = "m", act = "silu" }},
  {{ op = "linear", in = "m", out = "d", features = "hidden", weight = "d" }},
  {{ op = "add", in = ["x", "d"], out = "x" }},{tail}"#
            )
        };
        let joined = Step::AddNormMlp {
            add: 1,
            norm: 2,
            gate: 3,
            up: 4,
            glu: 5,
            down: 6,
            add_down: 7,
        };
        assert!(plan_of(&mlp("")).contains(&joined));
        for tail in [
            r#"  { op = "add", in = ["x", "a"], out = "x" },"#,
            r#"  { op = "add", in = ["x", "m"], out = "x" },"#,
        ] {
            let steps = plan_of(&mlp(tail));
            assert!(
                steps
                    .iter()
                    .any(|s| matches!(s, Step::AddNormGatedLinear { .. })),
                "{tail}: {steps:?}"
            );
        }
    }

    #[test]
    fn a_down_projection_named_like_the_sum_is_not_its_residual() {
        // The down projection's output reuses the name `x` of the first
        // add's sum, and adds into `b`: the MLP does not end in that sum.
        let ops = r#"
  { op = "linear", in = "x", out = "a", features = "hidden", weight = "o" },
  { op = "linear", in = "x", out = "b", features = "hidden", weight = "p" },
  { op = "add", in = ["x", "a"], out = "x" },
  { op = "rms_norm", in = "x", out = "h", weight = "n2", eps = 1e-6 },
  { op = "linear", in = "h", out = "g", features = 32, weight = "g" },
  { op = "linear", in = "h", out = "u", features = 32, weight = "u" },
  { op = "glu", gate = "g", up = "u", out = "m", act = "silu" },
  { op = "linear", in = "m", out = "x", features = "hidden", weight = "d" },
  { op = "add", in = ["b", "x"], out = "b" },
  { op = "add", in = ["b", "b"], out = "x" },"#;
        let steps = plan_of(ops);
        assert!(
            steps.contains(&Step::LinearAdd { linear: 7, add: 8 }),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|s| matches!(s, Step::AddNormMlp { .. })),
            "{steps:?}"
        );
    }

    #[test]
    fn a_gate_read_after_the_glu_stays_unfused() {
        let ops = r#"
  { op = "linear", in = "x", out = "g", features = 32, weight = "g" },
  { op = "linear", in = "x", out = "u", features = 32, weight = "u" },
  { op = "glu", gate = "g", up = "u", out = "m", act = "silu" },
  { op = "mul", in = ["m", "g"], out = "m" },
  { op = "linear", in = "m", out = "x", features = "hidden", weight = "d" },"#;
        // g is read by the mul: gate/up still share one call, the glu runs alone.
        assert_eq!(
            plan_of(ops),
            vec![
                Step::LinearMany(vec![0, 1]),
                Step::Op(2),
                Step::Op(3),
                Step::Op(4)
            ]
        );
    }

    #[test]
    fn a_linear_rebinding_its_input_ends_the_group() {
        let ops = r#"
  { op = "linear", in = "x", out = "a", features = "hidden", weight = "a" },
  { op = "linear", in = "x", out = "x", features = "hidden", weight = "b" },
  { op = "linear", in = "x", out = "c", features = "hidden", weight = "c" },
  { op = "add", in = ["a", "c"], out = "x" },"#;
        assert_eq!(
            plan_of(ops),
            vec![Step::Op(0), Step::Op(1), Step::Op(2), Step::Op(3)]
        );
    }

    #[test]
    fn a_norm_whose_output_is_read_before_the_rope_runs_alone() {
        let ops = format!(
            r#"{NORM_QK}
  {{ op = "rms_norm", in = "q", out = "q", weight = "qn", group = 8, eps = 1e-6 }},
  {{ op = "add", in = ["q", "k"], out = "s" }},
  {{ op = "rope", in = "q", out = "q", head_dim = 8, theta = 1e4 }},
  {{ op = "add", in = ["q", "s"], out = "x" }},"#
        );
        assert_eq!(
            plan_of(&ops),
            vec![
                Step::NormLinearMany {
                    norm: 0,
                    group: vec![1, 2]
                },
                Step::Op(3),
                Step::Op(4),
                Step::Op(5),
                Step::Op(6)
            ]
        );
    }

    /// Keys read again after the attention keep their own norm + rope
    /// call: the attention kernel's normalized copy never reaches memory.
    #[test]
    fn normed_keys_read_after_the_attention_stay_unmerged() {
        let ops = format!(r#"{NORM_QK}{ATTENTION}  {{ op = "add", in = ["a", "k"], out = "x" }},"#);
        let steps = plan_of(&ops);
        assert!(
            steps.contains(&Step::RmsNormRope2 {
                first: (4, 6),
                second: (5, 7)
            }) && steps.contains(&Step::Op(8)),
            "{steps:?}"
        );
    }

    #[test]
    fn a_norm_kept_alive_past_the_rope_runs_alone() {
        let ops = format!(
            r#"{NORM_QK}
  {{ op = "rms_norm", in = "q", out = "n", weight = "qn", group = 8, eps = 1e-6 }},
  {{ op = "rope", in = "n", out = "r", head_dim = 8, theta = 1e4 }},
  {{ op = "add", in = ["n", "r"], out = "x" }},"#
        );
        let steps = plan_of(&ops);
        assert!(steps.contains(&Step::Op(3)) && steps.contains(&Step::Op(4)));
    }

    #[test]
    fn a_product_read_after_the_add_is_not_folded_into_it() {
        let ops = r#"
  { op = "linear", in = "x", out = "m", features = "hidden", weight = "d" },
  { op = "add", in = ["x", "m"], out = "x" },
  { op = "add", in = ["x", "m"], out = "x" },
  { op = "linear", in = "x", out = "y", features = "hidden", weight = "e" },
  { op = "add", in = ["x", "y"], out = "z" },
  { op = "linear", in = "z", out = "w", features = "hidden", weight = "f" },
  { op = "add", in = ["w", "z"], out = "z" },
  { op = "add", in = ["z", "w"], out = "x" },"#;
        // m is read again; the add into z does not rebind the residual x;
        // w is read by the last add.
        assert_eq!(plan_of(ops), (0..8).map(Step::Op).collect::<Vec<_>>());
    }

    #[test]
    fn a_down_projection_folds_into_the_residual_either_way_round() {
        let ops = r#"
  { op = "rms_norm", in = "x", out = "h", weight = "n", eps = 1e-6 },
  { op = "linear", in = "h", out = "m", features = "hidden", weight = "d" },
  { op = "add", in = ["m", "x"], out = "x" },
  { op = "linear", in = "x", out = "m", features = "hidden", weight = "e" },
  { op = "add", in = ["m", "x"], out = "x" },"#;
        // The second product reads the residual itself: it stays unfused
        // (the residual cannot move while it is borrowed).
        assert_eq!(
            plan_of(ops),
            vec![
                Step::Op(0),
                Step::LinearAdd { linear: 1, add: 2 },
                Step::Op(3),
                Step::Op(4)
            ]
        );
    }

    #[test]
    fn a_normed_input_read_after_its_products_keeps_its_norm_apart() {
        let ops = r#"
  { op = "rms_norm", in = "x", out = "h", weight = "n", eps = 1e-6 },
  { op = "linear", in = "h", out = "q", features = "hidden", weight = "q" },
  { op = "linear", in = "h", out = "k", features = "hidden", weight = "k" },
  { op = "add", in = ["h", "q"], out = "x" },
  { op = "add", in = ["x", "k"], out = "s" },
  { op = "rms_norm", in = "s", out = "h", weight = "n2", eps = 1e-6 },
  { op = "linear", in = "h", out = "g", features = 32, weight = "g" },
  { op = "linear", in = "h", out = "u", features = 32, weight = "u" },
  { op = "glu", gate = "g", up = "u", out = "m", act = "silu" },
  { op = "add", in = ["m", "h"], out = "x" },"#;
        // h is read by an add after q/k, and the second h after the glu.
        assert_eq!(
            plan_of(ops),
            vec![
                Step::Op(0),
                Step::LinearMany(vec![1, 2]),
                Step::Op(3),
                Step::AddRmsNorm { add: 4, norm: 5 },
                Step::GatedLinear {
                    gate: 6,
                    up: 7,
                    glu: 8
                },
                Step::Op(9)
            ]
        );
    }

    #[test]
    fn conditional_ops_are_never_fused() {
        let ops = r#"
  { op = "add", in = ["x", "x"], out = "x" },
  { op = "rms_norm", in = "x", out = "x", weight = "n", eps = 1e-6, if = "hidden > 1" },"#;
        assert_eq!(plan_of(ops), vec![Step::Op(0), Step::Op(1)]);
    }
}
