//! The spec file's syntax tree and its parser. Every node keeps the byte span
//! it came from so later stages can point at the file.
//!
//! A spec has `[arch]`, `[params]`, optional `[[check]]`s, a `[prologue]`,
//! one or more `[[layer]]` blocks and an `[epilogue]`; see
//! `docs/SPEC_LANGUAGE.md` for the language.

use std::ops::Range;

use toml_edit::{ImDocument, Item, TableLike, Value as TomlValue};

use crate::diagnostic::{Diagnostic, Diagnostics, SourceFile};
use crate::expr::{self, did_you_mean, Expr};
use crate::ir::OpKind;
use crate::ops::{self, AttrKind, OpSchema};
use crate::value::Value;

pub type Span = Range<usize>;

#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

/// An expression as written in the spec, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecExpr {
    pub text: String,
    pub expr: Expr,
    pub span: Span,
    /// Byte offset of `text` in the file (inside the quotes).
    pub text_start: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParamSource {
    /// Read from `config.json` (first key present wins; dotted keys reach into
    /// objects), else `default`, else an error naming the keys.
    Config {
        keys: Vec<String>,
        default: Option<SpecExpr>,
    },
    /// Computed from other parameters.
    Derived(SpecExpr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub span: Span,
    pub source: ParamSource,
    pub doc: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub expr: SpecExpr,
    pub message: String,
}

/// A weight reference: `"name"` or `{ name, if, tied_to, tied_if }`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightRef {
    pub name: Spanned<String>,
    /// The weight exists only when this holds.
    pub cond: Option<SpecExpr>,
    /// When `tied_if` holds, `tied_to` (a full tensor name) is used instead.
    pub tied_to: Option<Spanned<String>>,
    pub tied_if: Option<SpecExpr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Expr(SpecExpr),
    Name(Spanned<String>),
    List(Vec<SpecExpr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpDecl {
    pub kind: OpKind,
    pub span: Span,
    pub cond: Option<SpecExpr>,
    /// `(key, activation names)`; `in` may name several for n-ary ops.
    pub inputs: Vec<(String, Vec<Spanned<String>>)>,
    pub outputs: Vec<Spanned<String>>,
    pub weights: Vec<(String, WeightRef)>,
    pub attrs: Vec<(String, AttrValue)>,
}

impl OpDecl {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn weight(&self, key: &str) -> Option<&WeightRef> {
        self.weights.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn input(&self, key: &str) -> &[Spanned<String>] {
        self.inputs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub name: String,
    pub span: Span,
    /// Selects the layers this block describes (`[[layer]]` only).
    pub when: Option<SpecExpr>,
    /// Prepended (with a `.`) to weight names; may contain `{i}`.
    pub prefix: Option<String>,
    pub ops: Vec<OpDecl>,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub source: SourceFile,
    pub name: String,
    pub hf_model_types: Vec<String>,
    pub summary: String,
    pub params: Vec<ParamDecl>,
    pub checks: Vec<Check>,
    pub prologue: Section,
    pub layers: Vec<Section>,
    pub epilogue: Section,
}

/// Parses and validates a spec file. All problems are reported together.
pub fn parse_spec(source: SourceFile) -> Result<Spec, Diagnostics> {
    let doc = match ImDocument::parse(source.text.clone()) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            return Err(Diagnostics(vec![
                source.diagnostic(span, format!("invalid TOML: {msg}"))
            ]));
        }
    };
    let mut p = SpecParser {
        src: &source,
        errors: Vec::new(),
    };
    let spec = p.spec(doc.as_table());
    if p.errors.is_empty() {
        if let Some(spec) = spec {
            let errors = crate::validate::validate(&spec);
            if errors.is_empty() {
                return Ok(spec);
            }
            return Err(Diagnostics(errors));
        }
    }
    Err(Diagnostics(p.errors))
}

struct SpecParser<'a> {
    src: &'a SourceFile,
    errors: Vec<Diagnostic>,
}

const TOP_KEYS: [&str; 6] = ["arch", "params", "check", "prologue", "layer", "epilogue"];

impl<'a> SpecParser<'a> {
    fn error(&mut self, span: Span, msg: impl Into<String>, hint: impl Into<String>) {
        let d = self.src.diagnostic(span, msg).with_hint(hint);
        self.errors.push(d);
    }

    fn key_span(&self, t: &dyn TableLike, key: &str) -> Span {
        t.get_key_value(key)
            .and_then(|(k, item)| k.span().or_else(|| item.span()))
            .unwrap_or(0..0)
    }

    fn spec(&mut self, root: &toml_edit::Table) -> Option<Spec> {
        for (key, _) in root.iter() {
            if !TOP_KEYS.contains(&key) {
                let span = self.key_span(root, key);
                self.error(
                    span,
                    format!("unknown section `{key}`"),
                    format!(
                        "sections are {}{}",
                        TOP_KEYS.join(", "),
                        did_you_mean(key, TOP_KEYS)
                    ),
                );
            }
        }
        let arch = self.table(root, "arch", true)?;
        let name = self.string(arch, "name", true).unwrap_or_default();
        let hf_model_types = self.string_list(arch, "hf_model_types");
        let summary = self.string(arch, "summary", false).unwrap_or_default();
        for (key, _) in arch.iter() {
            if !["name", "hf_model_types", "summary"].contains(&key) {
                let span = self.key_span(arch, key);
                self.error(
                    span,
                    format!("unknown key `{key}` in [arch]"),
                    "[arch] takes name, hf_model_types, summary",
                );
            }
        }
        let params = match self.table(root, "params", true) {
            Some(t) => self.params(t),
            None => Vec::new(),
        };
        let checks = self.checks(root);
        let prologue = self.section(root.get("prologue"), "prologue", root);
        let epilogue = self.section(root.get("epilogue"), "epilogue", root);
        let mut layers = Vec::new();
        match root.get("layer") {
            Some(Item::ArrayOfTables(arr)) => {
                for (idx, t) in arr.iter().enumerate() {
                    let label = format!("layer #{}", idx + 1);
                    if let Some(s) = self.section_table(t, &label) {
                        layers.push(s);
                    }
                }
            }
            Some(other) => self.error(
                other.span().unwrap_or(0..0),
                "`layer` must be an array of tables",
                "write each layer block as [[layer]]",
            ),
            None => self.error(
                0..0,
                "missing [[layer]] blocks",
                "a spec describes its repeated layers in one or more [[layer]] blocks",
            ),
        }
        Some(Spec {
            source: self.src.clone(),
            name,
            hf_model_types,
            summary,
            params,
            checks,
            prologue: prologue?,
            layers,
            epilogue: epilogue?,
        })
    }

    fn table<'t>(
        &mut self,
        parent: &'t dyn TableLike,
        key: &str,
        required: bool,
    ) -> Option<&'t dyn TableLike> {
        match parent.get(key) {
            Some(item) => match item.as_table_like() {
                Some(t) => Some(t),
                None => {
                    self.error(
                        item.span().unwrap_or(0..0),
                        format!("`{key}` must be a table"),
                        "",
                    );
                    None
                }
            },
            None => {
                if required {
                    self.error(0..0, format!("missing [{key}] section"), "");
                }
                None
            }
        }
    }

    fn string(&mut self, t: &dyn TableLike, key: &str, required: bool) -> Option<String> {
        match t.get(key) {
            Some(item) => match item.as_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    self.error(
                        item.span().unwrap_or(0..0),
                        format!("`{key}` must be a string"),
                        "",
                    );
                    None
                }
            },
            None => {
                if required {
                    self.error(0..0, format!("missing key `{key}`"), "");
                }
                None
            }
        }
    }

    fn string_list(&mut self, t: &dyn TableLike, key: &str) -> Vec<String> {
        let Some(item) = t.get(key) else {
            return Vec::new();
        };
        match item.as_array() {
            Some(arr) if arr.iter().all(|v| v.as_str().is_some()) => arr
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => {
                self.error(
                    item.span().unwrap_or(0..0),
                    format!("`{key}` must be a list of strings"),
                    "",
                );
                Vec::new()
            }
        }
    }

    /// An expression from a TOML string (parsed) or a literal number/bool.
    fn expr_of(&mut self, v: &TomlValue) -> Option<SpecExpr> {
        let span = v.span().unwrap_or(0..0);
        let lit = |value: Value, text: String| SpecExpr {
            text,
            expr: Expr::Lit(value),
            span: span.clone(),
            text_start: span.start,
        };
        match v {
            TomlValue::String(s) => {
                let text = s.value().to_string();
                let text_start = span.start + 1;
                match expr::parse(&text) {
                    Ok(expr) => Some(SpecExpr {
                        text,
                        expr,
                        span,
                        text_start,
                    }),
                    Err(e) => {
                        let at = text_start + e.offset;
                        self.error(
                            at..(at + 1).min(span.end.saturating_sub(1).max(at + 1)),
                            format!("invalid expression: {}", e.message),
                            "expressions use parameters, numbers, + - * / // %, comparisons, && || !, c ? a : b, x[i], x.field and min/max/sqrt/has/default",
                        );
                        None
                    }
                }
            }
            TomlValue::Integer(i) => Some(lit(Value::Int(*i.value()), i.value().to_string())),
            TomlValue::Float(f) => Some(lit(Value::Float(*f.value()), f.value().to_string())),
            TomlValue::Boolean(b) => Some(lit(Value::Bool(*b.value()), b.value().to_string())),
            _ => {
                self.error(
                    span,
                    "expected an expression (a string) or a number/bool",
                    "",
                );
                None
            }
        }
    }

    fn params(&mut self, t: &dyn TableLike) -> Vec<ParamDecl> {
        let mut out = Vec::new();
        for (name, item) in t.iter() {
            let span = self.key_span(t, name);
            if !is_ident(name) {
                self.error(
                    span.clone(),
                    format!("parameter name `{name}` is not an identifier"),
                    "use lowercase letters, digits and _",
                );
                continue;
            }
            let Some(value) = item.as_value() else {
                self.error(
                    span,
                    format!("parameter `{name}` must be a string or an inline table"),
                    "",
                );
                continue;
            };
            let mut doc = None;
            let source = match value {
                TomlValue::String(s) => Some(ParamSource::Config {
                    keys: vec![s.value().to_string()],
                    default: None,
                }),
                TomlValue::InlineTable(it) => {
                    for (k, _) in it.iter() {
                        if !["key", "default", "expr", "doc"].contains(&k) {
                            let kspan = self.key_span(it, k);
                            self.error(
                                kspan,
                                format!("unknown key `{k}` in parameter `{name}`"),
                                format!(
                                    "a parameter takes key, default, expr, doc{}",
                                    did_you_mean(k, ["key", "default", "expr", "doc"])
                                ),
                            );
                        }
                    }
                    doc = it.get("doc").and_then(|d| d.as_str()).map(str::to_string);
                    self.param_table(name, span.clone(), it)
                }
                _ => {
                    self.error(
                        value.span().unwrap_or(span.clone()),
                        format!("parameter `{name}` must be a config key (string) or an inline table"),
                        "e.g. heads = \"num_attention_heads\" or kv_heads = { key = \"num_key_value_heads\", default = \"heads\" }",
                    );
                    None
                }
            };
            if let Some(source) = source {
                out.push(ParamDecl {
                    name: name.to_string(),
                    span,
                    source,
                    doc,
                });
            }
        }
        out
    }

    fn param_table(
        &mut self,
        name: &str,
        span: Span,
        it: &toml_edit::InlineTable,
    ) -> Option<ParamSource> {
        if let Some(e) = it.get("expr") {
            if it.contains_key("key") || it.contains_key("default") {
                self.error(
                    span,
                    format!("parameter `{name}` has both `expr` and `key`/`default`"),
                    "a derived parameter (expr) is not read from the config",
                );
                return None;
            }
            return self.expr_of(e).map(ParamSource::Derived);
        }
        let keys = match it.get("key") {
            Some(TomlValue::String(s)) => vec![s.value().to_string()],
            Some(TomlValue::Array(a)) if a.iter().all(|v| v.as_str().is_some()) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(other) => {
                self.error(
                    other.span().unwrap_or(span),
                    format!("`key` of parameter `{name}` must be a string or a list of strings"),
                    "",
                );
                return None;
            }
            None => {
                self.error(
                    span,
                    format!("parameter `{name}` needs `key` (read from config.json) or `expr` (derived)"),
                    "",
                );
                return None;
            }
        };
        let default = match it.get("default") {
            Some(v) => Some(self.expr_of(v)?),
            None => None,
        };
        Some(ParamSource::Config { keys, default })
    }

    fn checks(&mut self, root: &toml_edit::Table) -> Vec<Check> {
        let mut out = Vec::new();
        let Some(item) = root.get("check") else {
            return out;
        };
        let Some(arr) = item.as_array_of_tables() else {
            self.error(
                item.span().unwrap_or(0..0),
                "`check` must be written as [[check]] tables",
                "",
            );
            return out;
        };
        for t in arr.iter() {
            let message = self.string(t, "message", true).unwrap_or_default();
            let expr = match t.get("expr").and_then(|i| i.as_value()) {
                Some(v) => self.expr_of(v),
                None => {
                    self.error(t.span().unwrap_or(0..0), "[[check]] needs `expr`", "");
                    None
                }
            };
            if let Some(expr) = expr {
                out.push(Check { expr, message });
            }
        }
        out
    }

    fn section(
        &mut self,
        item: Option<&Item>,
        name: &str,
        root: &toml_edit::Table,
    ) -> Option<Section> {
        match item.and_then(|i| i.as_table()) {
            Some(t) => self.section_table(t, name),
            None => {
                let span = self.key_span(root, name);
                self.error(span, format!("missing [{name}] section with `ops`"), "");
                None
            }
        }
    }

    fn section_table(&mut self, t: &toml_edit::Table, label: &str) -> Option<Section> {
        let is_layer = label.starts_with("layer");
        let allowed: &[&str] = if is_layer {
            &["name", "when", "prefix", "ops"]
        } else {
            &["prefix", "ops"]
        };
        for (key, _) in t.iter() {
            if !allowed.contains(&key) {
                let span = self.key_span(t, key);
                self.error(
                    span,
                    format!("unknown key `{key}` in {label}"),
                    format!("allowed keys: {}", allowed.join(", ")),
                );
            }
        }
        let span = t.span().unwrap_or(0..0);
        let name = if is_layer {
            self.string(t, "name", true)
                .unwrap_or_else(|| label.to_string())
        } else {
            label.to_string()
        };
        let when = match t.get("when").and_then(|i| i.as_value()) {
            Some(v) => self.expr_of(v),
            None => None,
        };
        let prefix = self.string(t, "prefix", false);
        let mut ops = Vec::new();
        match t.get("ops") {
            Some(Item::Value(TomlValue::Array(arr))) => {
                for v in arr.iter() {
                    match v.as_inline_table() {
                        Some(it) => ops.extend(self.op(it, v.span().unwrap_or(0..0))),
                        None => self.error(
                            v.span().unwrap_or(0..0),
                            "each op must be an inline table { op = \"...\", ... }",
                            "",
                        ),
                    }
                }
            }
            Some(Item::ArrayOfTables(arr)) => {
                for tt in arr.iter() {
                    ops.extend(self.op(tt, tt.span().unwrap_or(0..0)));
                }
            }
            Some(other) => self.error(
                other.span().unwrap_or(span.clone()),
                "`ops` must be an array of op tables",
                "",
            ),
            None => self.error(span.clone(), format!("{label} has no `ops`"), ""),
        }
        Some(Section {
            name,
            span,
            when,
            prefix,
            ops,
        })
    }

    fn op(&mut self, t: &dyn TableLike, span: Span) -> Option<OpDecl> {
        let op_name = match t.get("op").and_then(|i| i.as_str()) {
            Some(s) => s.to_string(),
            None => {
                self.error(span, "op without `op = \"...\"`", "");
                return None;
            }
        };
        let op_span = t.get("op").and_then(|i| i.span()).unwrap_or(span.clone());
        let Some(kind) = OpKind::from_spec_name(&op_name) else {
            let names = OpKind::ALL.map(|k| k.spec_name());
            self.error(
                op_span,
                format!("unknown op \"{op_name}\"{}", did_you_mean(&op_name, names)),
                format!("known ops: {}", names.join(", ")),
            );
            return None;
        };
        let schema = ops::schema_of(kind);
        let mut decl = OpDecl {
            kind,
            span: span.clone(),
            cond: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            weights: Vec::new(),
            attrs: Vec::new(),
        };
        for (key, item) in t.iter() {
            let kspan = self.key_span(t, key);
            let Some(value) = item.as_value() else {
                self.error(kspan, format!("`{key}` must be a value"), "");
                continue;
            };
            self.op_key(schema, &mut decl, key, kspan, value);
        }
        self.check_required(schema, &decl, op_span);
        Some(decl)
    }

    fn op_key(
        &mut self,
        schema: &OpSchema,
        decl: &mut OpDecl,
        key: &str,
        kspan: Span,
        value: &TomlValue,
    ) {
        let kind = schema.kind;
        if key == "op" {
        } else if key == "if" {
            decl.cond = self.expr_of(value);
        } else if key == "out" {
            decl.outputs = self.names(value, schema.multi_out, "out");
        } else if schema.inputs.contains(&key) {
            let many = key == "in" && schema.in_arity != 1;
            let names = self.names(value, many, key);
            if many && schema.in_arity != ops::ANY_ARITY && names.len() != schema.in_arity {
                self.error(
                    value.span().unwrap_or(kspan),
                    format!(
                        "`{kind}` takes {} inputs in `in`, found {}",
                        schema.in_arity,
                        names.len()
                    ),
                    "",
                );
            }
            decl.inputs.push((key.to_string(), names));
        } else if schema.weight(key).is_some() {
            if let Some(w) = self.weight_ref(value) {
                decl.weights.push((key.to_string(), w));
            }
        } else if let Some(attr) = schema.attr(key) {
            let v = match attr.kind {
                AttrKind::Expr => self.expr_of(value).map(AttrValue::Expr),
                AttrKind::Name(allowed) => match value.as_str() {
                    Some(s) if allowed.contains(&s) => Some(AttrValue::Name(Spanned {
                        value: s.to_string(),
                        span: value.span().unwrap_or(kspan),
                    })),
                    _ => {
                        let found = value.as_str().unwrap_or("?");
                        self.error(
                            value.span().unwrap_or(kspan),
                            format!(
                                "`{key}` of `{kind}` must be one of {}, found \"{found}\"{}",
                                allowed.join(", "),
                                did_you_mean(found, allowed.iter().copied())
                            ),
                            "",
                        );
                        None
                    }
                },
                AttrKind::ExprList => match value.as_array() {
                    Some(arr) => {
                        let items: Vec<_> = arr.iter().filter_map(|v| self.expr_of(v)).collect();
                        (items.len() == arr.len()).then_some(AttrValue::List(items))
                    }
                    None => {
                        self.error(
                            value.span().unwrap_or(kspan),
                            format!("`{key}` must be a list"),
                            "",
                        );
                        None
                    }
                },
            };
            if let Some(v) = v {
                decl.attrs.push((key.to_string(), v));
            }
        } else {
            let keys: Vec<&str> = schema.keys().collect();
            self.error(
                kspan,
                format!(
                    "op `{kind}` has no key `{key}`{}",
                    did_you_mean(key, keys.iter().copied())
                ),
                format!("`{kind}` takes: {}", keys[1..].join(", ")),
            );
        }
    }

    fn check_required(&mut self, schema: &OpSchema, decl: &OpDecl, op_span: Span) {
        let kind = schema.kind;
        let mut missing: Vec<&str> = Vec::new();
        for key in schema.inputs {
            let optional = schema.optional_inputs.contains(key);
            if !optional && !decl.inputs.iter().any(|(k, _)| k == key) {
                missing.push(key);
            }
        }
        if decl.outputs.is_empty() {
            missing.push("out");
        }
        missing.extend(
            schema
                .weights
                .iter()
                .filter(|w| w.required && decl.weight(w.key).is_none())
                .map(|w| w.key),
        );
        missing.extend(
            schema
                .attrs
                .iter()
                .filter(|a| a.required && decl.attr(a.key).is_none())
                .map(|a| a.key),
        );
        if !missing.is_empty() {
            self.error(
                op_span,
                format!(
                    "op `{kind}` is missing {}",
                    missing
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                schema.summary,
            );
        }
    }

    fn names(&mut self, value: &TomlValue, many: bool, key: &str) -> Vec<Spanned<String>> {
        let span = value.span().unwrap_or(0..0);
        let items: Vec<&TomlValue> = match value {
            TomlValue::Array(a) if many => a.iter().collect(),
            TomlValue::String(_) if !many => vec![value],
            _ => {
                let want = if many {
                    "a list of activation names"
                } else {
                    "an activation name (string)"
                };
                self.error(span, format!("`{key}` must be {want}"), "");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for v in items {
            let vspan = v.span().unwrap_or(span.clone());
            match v.as_str() {
                Some(s) if is_ident(s) => out.push(Spanned {
                    value: s.to_string(),
                    span: vspan,
                }),
                _ => self.error(
                    vspan,
                    format!(
                        "activation name {} is not an identifier",
                        v.to_string().trim()
                    ),
                    "use lowercase letters, digits and _",
                ),
            }
        }
        out
    }

    fn weight_ref(&mut self, value: &TomlValue) -> Option<WeightRef> {
        let span = value.span().unwrap_or(0..0);
        match value {
            TomlValue::String(s) => Some(WeightRef {
                name: Spanned {
                    value: s.value().to_string(),
                    span,
                },
                cond: None,
                tied_to: None,
                tied_if: None,
            }),
            TomlValue::InlineTable(it) => {
                const KEYS: [&str; 4] = ["name", "if", "tied_to", "tied_if"];
                for (k, _) in it.iter() {
                    if !KEYS.contains(&k) {
                        let kspan = self.key_span(it, k);
                        self.error(
                            kspan,
                            format!(
                                "unknown key `{k}` in weight reference{}",
                                did_you_mean(k, KEYS)
                            ),
                            "a weight is \"name\" or { name, if, tied_to, tied_if }",
                        );
                    }
                }
                let name = match it.get("name") {
                    Some(TomlValue::String(s)) => Spanned {
                        value: s.value().to_string(),
                        span: s.span().unwrap_or(span.clone()),
                    },
                    _ => {
                        self.error(span, "weight reference needs `name = \"...\"`", "");
                        return None;
                    }
                };
                let cond = it.get("if").and_then(|v| self.expr_of(v));
                let tied_to = it.get("tied_to").and_then(|v| {
                    v.as_str().map(|s| Spanned {
                        value: s.to_string(),
                        span: v.span().unwrap_or(span.clone()),
                    })
                });
                let tied_if = it.get("tied_if").and_then(|v| self.expr_of(v));
                if tied_to.is_some() != tied_if.is_some() {
                    self.error(span, "`tied_to` and `tied_if` go together", "e.g. { name = \"lm_head.weight\", tied_to = \"model.embed_tokens.weight\", tied_if = \"tie_embeddings\" }");
                }
                Some(WeightRef {
                    name,
                    cond,
                    tied_to,
                    tied_if,
                })
            }
            _ => {
                self.error(
                    span,
                    "a weight must be a tensor name or { name = ..., if = ... }",
                    "",
                );
                None
            }
        }
    }
}

pub fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
