//! CUDA kernels specialized for one model: `pie build --config` lowers the
//! architecture's spec against a `config.json` and instantiates the kernel
//! templates of `kernels/cuda/` with that model's constants baked in — the
//! input width `k` of every decode GEMV (a fixed trip count over `k`, so
//! the loop unrolls) and each gated MLP's activation. The result is extra
//! CUDA source, compiled by NVRTC after the generic kernels (whose
//! templates it calls) and embedded with them; the driver launches a
//! specialized entry point where one matches the model it runs and the
//! generic kernel otherwise.
//!
//! Entry points are named `<generic kernel>_k<K>` (and `_<activation>`
//! for the GLU GEMVs): the driver finds them by that name, so the scheme
//! here and in `drivers/cuda` must agree (a test there checks).

use std::collections::BTreeSet;
use std::fmt::Write;

use pie_archspec::ir::{self, ActivationFn, Node, NodeOp};

/// Generated kernel source and the names of its entry points.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecializedKernels {
    pub source: String,
    pub names: Vec<String>,
}

/// The GEMV kernels (`gemv.cu`) instantiated for every input width, with
/// their parameter lists and the template each calls.
const GEMV_KERNELS: [(&str, &str, &str); 2] = [
    (
        "pie_gemv_bf16",
        "float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ w, int m, int n, int k",
        "pie_gemv_entry<{K}, {MR}>(out, x, w, m, n, k)",
    ),
    (
        "pie_gemv_add_bf16",
        "float* out, const float* __restrict__ x, const unsigned short* __restrict__ w, int m, int n, int k",
        "pie_gemv_add_entry<{K}, {MR}>(out, x, w, m, n, k)",
    ),
];

/// The multi-product GEMVs (`gemv.cu`), instantiated for the widths of
/// inputs that two or more linear ops read (q/k/v projections).
const GEMV3_KERNELS: [(&str, &str, &str); 2] = [
    (
        "pie_gemv3_bf16",
        "float* out0, const unsigned short* __restrict__ w0, int n0, float* out1, const unsigned short* __restrict__ w1, int n1, float* out2, const unsigned short* __restrict__ w2, int n2, const float* __restrict__ x, int m, int k",
        "pie_gemv3<false, {K}, {MR}>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, m, k, PieGemvNorm{})",
    ),
    (
        "pie_gemv3_norm_bf16",
        "float* out0, const unsigned short* __restrict__ w0, int n0, float* out1, const unsigned short* __restrict__ w1, int n1, float* out2, const unsigned short* __restrict__ w2, int n2, const float* __restrict__ x, const float* g, int has_g, float eps, float offset, int m, int k",
        "pie_gemv3_norm_entry<{K}, {MR}>(out0, w0, n0, out1, w1, n1, out2, w2, n2, x, g, has_g, eps, offset, m, k)",
    ),
];

/// The GLU GEMV kernels (`fused.cu`), instantiated per (width, activation),
/// with their launch bounds.
const GLU_KERNELS: [(&str, &str, &str, &str); 2] = [
    (
        "pie_gemv_glu_bf16",
        "PIE_GEMV_THREADS",
        "float* __restrict__ out, const float* __restrict__ x, const unsigned short* __restrict__ wg, const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit",
        "pie_gemv_glu_entry<{K}, {FN}, {MR}>(out, x, wg, wu, m, n, k, fn, limit)",
    ),
    (
        "pie_gemv_glu_norm_bf16",
        "PIE_GEMV_THREADS, 3",
        "float* __restrict__ out, float* sum, const float* __restrict__ x, const float* y, int has_y, const float* g, int has_g, float eps, float offset, const unsigned short* __restrict__ wg, const unsigned short* __restrict__ wu, int m, int n, int k, int fn, float limit",
        "pie_gemv_glu_norm_entry<{K}, {FN}, {MR}>(out, sum, x, y, has_y, g, has_g, eps, offset, wg, wu, m, n, k, fn, limit)",
    ),
];

/// Most rows each specialized kernel is compiled for: the GEMVs' 4, and 1
/// (batch-1 decode, far fewer registers: the `_m1` forms, as the generic
/// kernels have them).
const ROW_FORMS: [usize; 2] = [4, 1];

/// Name of GEMV kernel `generic` specialized for input width `k` (and, if
/// `single_row`, for one row: `_m1`).
pub fn gemv_kernel_name(generic: &str, k: usize, single_row: bool) -> String {
    format!("{generic}_k{k}{}", if single_row { "_m1" } else { "" })
}

/// Name of GLU GEMV kernel `generic` specialized for input width `k` and
/// activation `act` (and one row).
pub fn glu_kernel_name(generic: &str, k: usize, act: ActivationFn, single_row: bool) -> String {
    format!(
        "{}_{}",
        gemv_kernel_name(generic, k, single_row),
        act.spec_name()
    )
}

/// The kernels specialized for `models` (one architecture's, or several):
/// the union of their widths and activations.
pub fn specialized_kernels(models: &[&ir::Model]) -> SpecializedKernels {
    let mut widths = BTreeSet::new();
    let mut shared = BTreeSet::new();
    let mut glus = BTreeSet::new();
    for model in models {
        widths.extend(gemv_widths(model));
        shared.extend(shared_input_widths(model));
        glus.extend(glu_shapes(model));
    }
    let mut source = String::new();
    let mut names = Vec::new();
    let listed: Vec<String> = widths.iter().map(|k| k.to_string()).collect();
    let _ = writeln!(
        source,
        "// Generated by pie-codegen (codegen/src/cuda_kernels.rs): the GEMV templates of\n\
         // gemv.cu and fused.cu with their input width k baked in (k = {}) and each\n\
         // gated MLP's activation, for up to 4 rows and for 1 (_m1), for these models:",
        if listed.is_empty() {
            "none".to_string()
        } else {
            listed.join(", ")
        },
    );
    for model in models {
        let _ = writeln!(
            source,
            "//   `{}` ({}): hidden {}, {} layers, vocab {}",
            model.arch,
            model.spec_path,
            model.hidden,
            model.layers.len(),
            model.vocab
        );
    }
    let _ = writeln!(
        source,
        "// Do not edit: `pie build --config` writes this next to the kernels it compiles."
    );
    for &k in &widths {
        let _ = writeln!(source, "\n// ---- k = {k}");
        let multi = shared.contains(&k).then_some(GEMV3_KERNELS);
        let kernels = GEMV_KERNELS.into_iter().chain(multi.into_iter().flatten());
        for ((generic, params, body), rows) in kernels.flat_map(|g| ROW_FORMS.map(|r| (g, r))) {
            let name = gemv_kernel_name(generic, k, rows == 1);
            let call = body
                .replace("{K}", &k.to_string())
                .replace("{MR}", &rows.to_string());
            // The single-row multi-product forms are bounded as gemv.cu's.
            let bounds = if rows == 1 && generic.starts_with("pie_gemv3") {
                "PIE_GEMV_THREADS, PIE_GEMV3_M1_BLOCKS"
            } else {
                "PIE_GEMV_THREADS"
            };
            let _ = writeln!(
                source,
                "extern \"C\" __global__ void __launch_bounds__({bounds})\n{name}({params}) {{\n    {call};\n}}"
            );
            names.push(name);
        }
    }
    for &(k, act) in &glus {
        let _ = writeln!(
            source,
            "\n// ---- gated MLP: k = {k}, activation {} (code {})",
            act.spec_name(),
            act.kernel_code()
        );
        for ((generic, bounds, params, body), rows) in GLU_KERNELS
            .into_iter()
            .flat_map(|g| ROW_FORMS.map(|r| (g, r)))
        {
            let name = glu_kernel_name(generic, k, act, rows == 1);
            let call = body
                .replace("{K}", &k.to_string())
                .replace("{FN}", &act.kernel_code().to_string())
                .replace("{MR}", &rows.to_string());
            let _ = writeln!(
                source,
                "extern \"C\" __global__ void __launch_bounds__({bounds})\n{name}({params}) {{\n    {call};\n}}"
            );
            names.push(name);
        }
    }
    SpecializedKernels { source, names }
}

/// Every section's enabled nodes, in order.
fn sections(model: &ir::Model) -> impl Iterator<Item = Vec<&Node>> {
    std::iter::once(&model.prologue)
        .chain(model.layers.iter().map(|l| &l.nodes))
        .chain(std::iter::once(&model.epilogue))
        .map(|nodes| nodes.iter().filter(|n| n.enabled).collect())
}

/// The input widths of the model's linear ops that the GEMVs take (a
/// multiple of 8: 16-byte weight loads).
fn gemv_widths(model: &ir::Model) -> BTreeSet<usize> {
    model
        .nodes()
        .filter(|n| n.enabled)
        .filter_map(|n| match &n.op {
            NodeOp::Linear(a) if a.in_features % 8 == 0 => Some(a.in_features),
            _ => None,
        })
        .collect()
}

/// The widths of inputs read by two or more linear ops of one section.
fn shared_input_widths(model: &ir::Model) -> BTreeSet<usize> {
    let mut widths = BTreeSet::new();
    for nodes in sections(model) {
        for (i, node) in nodes.iter().enumerate() {
            let NodeOp::Linear(a) = &node.op else {
                continue;
            };
            let shared = nodes[i + 1..].iter().any(|n| {
                matches!(n.op, NodeOp::Linear(_)) && n.inputs.first() == node.inputs.first()
            });
            if shared && a.in_features % 8 == 0 {
                widths.insert(a.in_features);
            }
        }
    }
    widths
}

/// (input width of the gate projection, activation) of every plain gated
/// MLP (no clamp limit): what the GLU GEMVs fuse.
fn glu_shapes(model: &ir::Model) -> BTreeSet<(usize, ActivationFn)> {
    let mut shapes = BTreeSet::new();
    for nodes in sections(model) {
        for (i, node) in nodes.iter().enumerate() {
            let NodeOp::Glu(glu) = &node.op else { continue };
            if glu.limit.is_some() {
                continue;
            }
            let Some(gate) = node.inputs.first() else {
                continue;
            };
            // The latest linear before the GLU that wrote its gate input.
            let width = nodes[..i].iter().rev().find_map(|n| match &n.op {
                NodeOp::Linear(a) if n.outputs.contains(gate) => Some(a.in_features),
                _ => None,
            });
            if let Some(k) = width.filter(|k| k % 8 == 0) {
                shapes.insert((k, glu.func));
            }
        }
    }
    shapes
}
