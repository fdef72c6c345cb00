//! Code for one spec section (prologue, a `[[layer]]` block, epilogue): a
//! struct holding its weights and op attributes, its loader and its forward.

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

use pie_archspec::ir::OpKind;
use pie_archspec::ops::schema_of;
use pie_archspec::spec::{OpDecl, Section};

use crate::fusion::{self, Step};
use crate::naming::{weight_field, Names};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prologue,
    Layer,
    Epilogue,
}

/// A weight an op reads, as a struct field.
struct WeightField {
    key: &'static str,
    field: Ident,
    /// `Option<Arc<W>>` (conditional) rather than `Arc<W>`.
    optional: bool,
    doc: String,
}

struct OpGen<'a> {
    index: usize,
    decl: &'a OpDecl,
    attrs: Ident,
    weights: Vec<WeightField>,
}

pub struct SectionGen<'a> {
    pub ty: Ident,
    role: Role,
    section: &'a Section,
    ops: Vec<OpGen<'a>>,
}

impl<'a> SectionGen<'a> {
    pub fn new(section: &'a Section, ty: &str, role: Role) -> Self {
        let mut names = Names::default();
        let ops = section
            .ops
            .iter()
            .enumerate()
            .map(|(index, decl)| {
                let attrs = format_ident!(
                    "{}",
                    names.unique(format!("n{index}_{}", decl.kind.spec_name()))
                );
                let schema = schema_of(decl.kind);
                let weights = schema
                    .weights
                    .iter()
                    .filter_map(|ws| {
                        let wref = decl.weight(ws.key)?;
                        let field = names.unique(weight_field(&wref.name.value));
                        Some(WeightField {
                            key: ws.key,
                            field: format_ident!("{field}"),
                            optional: decl.cond.is_some() || wref.cond.is_some(),
                            doc: match &section.prefix {
                                Some(p) => format!("`{p}.{}`", wref.name.value),
                                None => format!("`{}`", wref.name.value),
                            },
                        })
                    })
                    .collect();
                OpGen {
                    index,
                    decl,
                    attrs,
                    weights,
                }
            })
            .collect();
        SectionGen {
            ty: format_ident!("{ty}"),
            role,
            section,
            ops,
        }
    }

    pub fn items(&self) -> TokenStream {
        let ty = &self.ty;
        let doc = match self.role {
            Role::Prologue => "Ops before the first layer.".to_string(),
            Role::Epilogue => "Ops after the last layer, ending in the logits.".to_string(),
            Role::Layer => format!("Layer block `{}`.", self.section.name),
        };
        let fields = self.ops.iter().flat_map(|op| {
            let attrs = &op.attrs;
            let attr_ty = attr_type(op.decl.kind);
            let attr_field = if op.decl.cond.is_some() {
                quote!(pub #attrs: Option<#attr_ty>,)
            } else {
                quote!(pub #attrs: #attr_ty,)
            };
            let weights = op.weights.iter().map(|w| {
                let (f, d) = (&w.field, &w.doc);
                if w.optional {
                    quote!(#[doc = #d] pub #f: Option<Arc<D::Weight>>,)
                } else {
                    quote!(#[doc = #d] pub #f: Arc<D::Weight>,)
                }
            });
            std::iter::once(attr_field)
                .chain(weights)
                .collect::<Vec<_>>()
        });
        let load = self.load_fn();
        let forward = self.forward_fn();
        quote! {
            #[doc = #doc]
            pub struct #ty<D: Driver> {
                #(#fields)*
            }
            impl<D: Driver> #ty<D> {
                #load
                #forward
            }
        }
    }

    fn load_fn(&self) -> TokenStream {
        let steps = self.ops.iter().map(|op| {
            let i = op.index;
            let attrs = &op.attrs;
            let getter = attr_getter(op.decl.kind);
            let weights = op.weights.iter().map(|w| {
                let (f, key) = (&w.field, w.key);
                if w.optional {
                    quote!(let #f = if enabled { store.optional(n, #key)? } else { None };)
                } else {
                    quote!(let #f = store.required(n, #key)?;)
                }
            });
            let attr_value = if op.decl.cond.is_some() {
                quote!(if enabled { Some(#getter) } else { None })
            } else {
                getter
            };
            quote! {
                let n = loader::node(nodes, #i, section)?;
                let enabled = n.enabled;
                let #attrs = #attr_value;
                #(#weights)*
            }
        });
        let together = self.plan().into_iter().filter_map(|step| {
            let group = match step {
                Step::LinearMany(group) | Step::NormLinearMany { group, .. } => group,
                Step::GatedLinear { gate, up, .. }
                | Step::AddNormGatedLinear { gate, up, .. }
                | Step::AddNormMlp { gate, up, .. } => {
                    vec![gate, up]
                }
                _ => return None,
            };
            let idx = group.iter().map(|&i| self.ops[i].index);
            Some(quote! {
                store.load_together(&[#(loader::node(nodes, #idx, section)?),*], "weight")?;
            })
        });
        let names = self.ops.iter().flat_map(|op| {
            std::iter::once(op.attrs.clone()).chain(op.weights.iter().map(|w| w.field.clone()))
        });
        quote! {
            pub fn load(store: &mut WeightStore<'_, D>, nodes: &[ir::Node], section: &str) -> Result<Self> {
                // Matrices one fused call reads, loaded side by side.
                #(#together)*
                #(#steps)*
                Ok(Self { #(#names),* })
            }
        }
    }

    /// The name of the activation the section returns.
    fn result(&self) -> Ident {
        match self.role {
            Role::Epilogue => format_ident!("logits"),
            _ => format_ident!("x"),
        }
    }

    /// The calls the forward makes (`fusion::plan`).
    fn plan(&self) -> Vec<Step> {
        fusion::plan(&self.section.ops, &self.result().to_string())
    }

    fn forward_fn(&self) -> TokenStream {
        let result = self.result();
        let body = self
            .plan()
            .into_iter()
            .map(|step| self.step_call(&step))
            .collect::<Vec<_>>();
        match self.role {
            Role::Prologue => quote! {
                pub fn forward(&self, d: &D, kv: &mut D::Kv, batch: &ForwardBatch) -> Result<D::Act> {
                    let l = self;
                    #(#body)*
                    Ok(#result)
                }
            },
            _ => quote! {
                pub fn forward(&self, d: &D, kv: &mut D::Kv, batch: &ForwardBatch, x: D::Act) -> Result<D::Act> {
                    let l = self;
                    #(#body)*
                    Ok(#result)
                }
            },
        }
    }

    /// The code for one step of the fusion plan.
    fn step_call(&self, step: &Step) -> TokenStream {
        let op = |i: usize| &self.ops[i];
        match step {
            Step::Op(i) => self.op_call(op(*i)),
            Step::LinearMany(group) => {
                let x = op(group[0]).input("in", 0);
                let (ws, bs, attrs, outs) = self.products(group);
                quote! {
                    let mut outs = d.linear_many(#x, &[#(#ws),*], &[#(#bs),*], &[#(#attrs),*])?.into_iter();
                    #( let #outs = loader::next_part(&mut outs)?; )*
                }
            }
            Step::NormLinearMany { norm, group } => {
                let n = op(*norm);
                let (x, w, na) = (n.input("in", 0), n.weight("weight"), n.attrs());
                let (ws, bs, attrs, outs) = self.products(group);
                quote! {
                    let mut outs = d
                        .norm_linear_many(#x, (#w, #na), &[#(#ws),*], &[#(#bs),*], &[#(#attrs),*])?
                        .into_iter();
                    #( let #outs = loader::next_part(&mut outs)?; )*
                }
            }
            Step::GatedLinear { gate, up, glu } => {
                let x = op(*gate).input("in", 0);
                let (g, u, a, out) = self.gate_up(*gate, *up, *glu);
                quote!(let #out = d.gated_linear(#x, #g, #u, #a)?;)
            }
            Step::AddNormGatedLinear {
                add,
                norm,
                gate,
                up,
                glu,
            } => {
                let (s, n) = (op(*add), op(*norm));
                let (x, y, aa) = (s.input("in", 0), s.input("in", 1), s.attrs());
                let (w, na) = (n.weight("weight"), n.attrs());
                let (g, u, a, out) = self.gate_up(*gate, *up, *glu);
                let sum = s.output();
                quote! {
                    let (sum, #out) = d.add_norm_gated_linear(#x, #y, #aa, (#w, #na), #g, #u, #a)?;
                    let #sum = sum;
                }
            }
            Step::AddNormMlp {
                add,
                norm,
                gate,
                up,
                glu,
                down,
                add_down,
            } => {
                let (s, n, l) = (op(*add), op(*norm), op(*down));
                let (x, aa) = (s.input("in", 0), s.attrs());
                let y = format_ident!("{}", s.decl.input("in")[1].value);
                let (w, na) = (n.weight("weight"), n.attrs());
                let (g, u, a, _) = self.gate_up(*gate, *up, *glu);
                let (dw, db, da) = (l.required("weight"), l.weight("bias"), l.attrs());
                let (ad, out) = (op(*add_down).attrs(), op(*add_down).output());
                quote! {
                    let #out = d.add_norm_mlp(#x, #y, #aa, (#w, #na), #g, #u, #a, (#dw, #db, #da), #ad)?;
                }
            }
            Step::AddRmsNorm { add, norm } => {
                let (s, n) = (op(*add), op(*norm));
                let (x, y, aa) = (s.input("in", 0), s.input("in", 1), s.attrs());
                let (w, na) = (n.weight("weight"), n.attrs());
                let (sum, normed) = (s.output(), n.output());
                quote! {
                    let (sum, normed) = d.add_rms_norm(#x, #y, #aa, #w, #na)?;
                    let #sum = sum;
                    let #normed = normed;
                }
            }
            Step::LinearAdd { linear, add } => {
                let (l_op, a_op) = (op(*linear), op(*add));
                let (x, w, b, la) = (
                    l_op.input("in", 0),
                    l_op.required("weight"),
                    l_op.weight("bias"),
                    l_op.attrs(),
                );
                let product = &l_op.decl.outputs[0].value;
                let residual = a_op
                    .decl
                    .input("in")
                    .iter()
                    .find(|n| &n.value != product)
                    .map(|n| format_ident!("{}", n.value))
                    .expect("the fusion plan checked the add's operands");
                let (aa, out) = (a_op.attrs(), a_op.output());
                quote!(let #out = d.linear_add(#x, #w, #b, #la, #residual, #aa)?;)
            }
            Step::RmsNormRope2 { first, second } => {
                let ((a, out_a), (b, out_b)) =
                    (self.norm_rope_part(*first), self.norm_rope_part(*second));
                quote!(let (#out_a, #out_b) = d.rms_norm_rope2(#a, #b, batch)?;)
            }
            Step::NormRopeAttention {
                first,
                second,
                attention,
            } => {
                let ((q, _), (k, _)) = (self.norm_rope_part(*first), self.norm_rope_part(*second));
                let att = op(*attention);
                let (v, s, aa, out) = (
                    att.input("v", 0),
                    att.weight("sinks"),
                    att.attrs(),
                    att.output(),
                );
                quote!(let #out = d.norm_rope_attention(#q, #k, #v, #s, kv, batch, #aa)?;)
            }
            Step::RmsNormRope { norm, rope } => {
                let (n, r) = (op(*norm), op(*rope));
                let (x, w, na) = (n.input("in", 0), n.weight("weight"), n.attrs());
                let (ra, out) = (r.attrs(), r.output());
                quote!(let #out = d.rms_norm_rope(#x, #w, #na, batch, #ra)?;)
            }
        }
    }

    /// The `(x, weight, norm attrs, rope attrs)` operand of a norm + rope
    /// pair, and the rope's output.
    fn norm_rope_part(&self, (norm, rope): (usize, usize)) -> (TokenStream, Ident) {
        let (n, r) = (&self.ops[norm], &self.ops[rope]);
        let (x, w, na, ra) = (n.input("in", 0), n.weight("weight"), n.attrs(), r.attrs());
        (quote!((#x, #w, #na, #ra)), r.output())
    }

    /// Weights, biases, attributes and outputs of a group of `linear` ops.
    fn products(
        &self,
        group: &[usize],
    ) -> (
        Vec<TokenStream>,
        Vec<TokenStream>,
        Vec<TokenStream>,
        Vec<Ident>,
    ) {
        let ops = group.iter().map(|&i| &self.ops[i]);
        (
            ops.clone().map(|o| o.required("weight")).collect(),
            ops.clone().map(|o| o.weight("bias")).collect(),
            ops.clone().map(|o| o.attrs()).collect(),
            ops.map(|o| o.output()).collect(),
        )
    }

    /// The gate and up operands `(weight, bias, attrs)`, the glu's
    /// attributes and its output.
    fn gate_up(
        &self,
        gate: usize,
        up: usize,
        glu: usize,
    ) -> (TokenStream, TokenStream, TokenStream, Ident) {
        let operand = |i: usize| {
            let o = &self.ops[i];
            let (w, b, a) = (o.required("weight"), o.weight("bias"), o.attrs());
            quote!((#w, #b, #a))
        };
        let m = &self.ops[glu];
        (operand(gate), operand(up), m.attrs(), m.output())
    }

    /// `let out = d.op(inputs, weights, &attrs)?;` for one op.
    fn op_call(&self, op: &OpGen) -> TokenStream {
        let decl = op.decl;
        let conditional = decl.cond.is_some();
        let attrs_field = &op.attrs;
        let a = if conditional { quote!(a) } else { op.attrs() };
        let call = match decl.kind {
            OpKind::Embedding => {
                let w = op.required("weight");
                quote!(d.embedding(#w, batch, #a)?)
            }
            OpKind::Linear => {
                let (x, w, b) = (op.input("in", 0), op.required("weight"), op.weight("bias"));
                quote!(d.linear(#x, #w, #b, #a)?)
            }
            OpKind::RmsNorm => {
                let (x, w) = (op.input("in", 0), op.weight("weight"));
                quote!(d.rms_norm(#x, #w, #a)?)
            }
            OpKind::Rope => {
                let x = op.input("in", 0);
                quote!(d.rope(#x, batch, #a)?)
            }
            OpKind::LayerNorm => {
                let (x, w, b) = (op.input("in", 0), op.weight("weight"), op.weight("bias"));
                quote!(d.layer_norm(#x, #w, #b, #a)?)
            }
            OpKind::Attention => {
                let (q, s) = (op.input("q", 0), op.weight("sinks"));
                // k/v are absent where the op reads another layer's cache.
                let (k, v) = (op.optional_input("k"), op.optional_input("v"));
                quote!(d.attention(#q, #k, #v, #s, kv, batch, #a)?)
            }
            OpKind::Add | OpKind::Mul => {
                let method = format_ident!("{}", decl.kind.spec_name());
                let (x, y) = (op.input("in", 0), op.input("in", 1));
                quote!(d.#method(#x, #y, #a)?)
            }
            OpKind::Scale => {
                let (x, w) = (op.input("in", 0), op.weight("weight"));
                quote!(d.scale(#x, #w, #a)?)
            }
            OpKind::Concat => {
                let parts = decl.input("in").iter().map(|n| {
                    let name = format_ident!("{}", n.value);
                    quote!(&#name)
                });
                quote!(d.concat(&[#(#parts),*], #a)?)
            }
            OpKind::Mix => {
                let (x, c) = (op.input("in", 0), op.input("coefs", 0));
                quote!(d.mix(#x, #c, #a)?)
            }
            OpKind::Rms | OpKind::GaussianTopk => {
                let method = format_ident!("{}", decl.kind.spec_name());
                let x = op.input("in", 0);
                quote!(d.#method(#x, #a)?)
            }
            OpKind::Softcap | OpKind::Activation => {
                let method = format_ident!("{}", decl.kind.spec_name());
                let x = op.input("in", 0);
                quote!(d.#method(#x, #a)?)
            }
            OpKind::Glu => {
                let (g, u) = (op.input("gate", 0), op.input("up", 0));
                quote!(d.glu(#g, #u, #a)?)
            }
            OpKind::Split => {
                let x = op.input("in", 0);
                let outs = decl.outputs.iter().map(|o| format_ident!("{}", o.value));
                // A split binds several names; it cannot be conditional
                // (validation requires conditional ops to map in to out).
                return quote! {
                    let mut parts = d.split(#x, #a)?.into_iter();
                    #( let #outs = loader::next_part(&mut parts)?; )*
                };
            }
            OpKind::Moe | OpKind::GatedDeltaNet | OpKind::Mamba2 | OpKind::MlaAttention => {
                let kind = format_ident!("{}", format!("{:?}", decl.kind));
                let x = op.input("in", 0);
                let weights = schema_of(decl.kind)
                    .weights
                    .iter()
                    .map(|ws| op.weight(ws.key));
                quote!(d.composite(ir::OpKind::#kind, &[#x], &[#(#weights),*], #a, kv, batch)?)
            }
        };
        let out = format_ident!("{}", decl.outputs[0].value);
        if conditional {
            let passthrough = format_ident!("{}", decl.input("in")[0].value);
            quote! {
                let #out = match &l.#attrs_field {
                    Some(a) => #call,
                    None => #passthrough,
                };
            }
        } else {
            quote!(let #out = #call;)
        }
    }
}

impl OpGen<'_> {
    fn conditional(&self) -> bool {
        self.decl.cond.is_some()
    }

    /// `&l.attrs` (unconditional ops only: a conditional op's attributes
    /// are bound by the `match` around its call).
    fn attrs(&self) -> TokenStream {
        let f = &self.attrs;
        quote!(&l.#f)
    }

    fn output(&self) -> Ident {
        format_ident!("{}", self.decl.outputs[0].value)
    }

    fn input(&self, key: &str, n: usize) -> TokenStream {
        let name = format_ident!("{}", self.decl.input(key)[n].value);
        quote!(&#name)
    }

    fn optional_input(&self, key: &str) -> TokenStream {
        match self.decl.input(key).first() {
            Some(n) => {
                let name = format_ident!("{}", n.value);
                quote!(Some(&#name))
            }
            None => quote!(None),
        }
    }

    fn weight(&self, key: &str) -> TokenStream {
        match self.weights.iter().find(|w| w.key == key) {
            None => quote!(None),
            Some(w) if w.optional && self.conditional() => {
                let (f, d) = (&w.field, &w.doc);
                quote!(Some(&*loader::present(&l.#f, #d)?))
            }
            Some(w) if w.optional => {
                let f = &w.field;
                quote!(l.#f.as_deref())
            }
            Some(w) => {
                let f = &w.field;
                quote!(Some(&*l.#f))
            }
        }
    }

    /// A weight the op cannot run without: `&W`, or an error naming it
    /// when a conditional left it unloaded.
    fn required(&self, key: &str) -> TokenStream {
        match self.weights.iter().find(|w| w.key == key) {
            Some(w) if w.optional => {
                let (f, d) = (&w.field, &w.doc);
                quote!(&*loader::present(&l.#f, #d)?)
            }
            Some(w) => {
                let f = &w.field;
                quote!(&l.#f)
            }
            None => unreachable!("the parser rejects ops without their required weights"),
        }
    }
}

fn attr_type(kind: OpKind) -> TokenStream {
    match kind {
        OpKind::Embedding => quote!(ir::EmbeddingAttrs),
        OpKind::Linear => quote!(ir::LinearAttrs),
        OpKind::RmsNorm => quote!(ir::RmsNormAttrs),
        OpKind::Rope => quote!(ir::RopeAttrs),
        OpKind::Attention => quote!(ir::AttentionAttrs),
        OpKind::Add | OpKind::Mul => quote!(ir::ElementwiseAttrs),
        OpKind::Scale => quote!(ir::ScaleAttrs),
        OpKind::Glu => quote!(ir::GluAttrs),
        OpKind::Activation => quote!(ir::ActivationAttrs),
        OpKind::Softcap => quote!(ir::SoftcapAttrs),
        OpKind::LayerNorm => quote!(ir::LayerNormAttrs),
        OpKind::Split => quote!(ir::SplitAttrs),
        OpKind::Concat => quote!(ir::ConcatAttrs),
        OpKind::Mix => quote!(ir::MixAttrs),
        OpKind::Rms => quote!(ir::RmsAttrs),
        OpKind::GaussianTopk => quote!(ir::GaussianTopkAttrs),
        OpKind::Moe | OpKind::GatedDeltaNet | OpKind::Mamba2 | OpKind::MlaAttention => {
            quote!(ir::CompositeAttrs)
        }
    }
}

fn attr_getter(kind: OpKind) -> TokenStream {
    match kind {
        OpKind::Moe | OpKind::GatedDeltaNet | OpKind::Mamba2 | OpKind::MlaAttention => {
            let k = format_ident!("{}", format!("{:?}", kind));
            quote!(loader::composite_attrs(n, ir::OpKind::#k)?)
        }
        other => {
            let f = format_ident!("{}_attrs", other.spec_name());
            quote!(loader::#f(n)?)
        }
    }
}
