//! Binds a spec's parameters to a Hugging Face `config.json` and runs its
//! checks. Errors name the config key and the spec line that asked for it.

use std::collections::HashMap;

use crate::expr;
use crate::spec::{ParamDecl, ParamSource, Spec, SpecExpr};
use crate::value::Value;

/// A user-facing error from binding or lowering.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BindError(pub String);

/// Where a bound value came from, for messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Config(String),
    Default,
    Derived,
}

#[derive(Debug, Clone)]
pub struct Bindings {
    pub values: Vec<(String, Value, Origin)>,
    index: HashMap<String, usize>,
}

impl Bindings {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.index.get(name).map(|&i| &self.values[i].1)
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name).map(|&i| &self.values[i]) {
            Some((_, v, Origin::Config(key))) => format!("{name}={v} (config `{key}`)"),
            Some((_, v, _)) => format!("{name}={v}"),
            None => name.to_string(),
        }
    }
}

/// Reads `key` from the config; dots reach into nested objects
/// (`rope_parameters.rope_theta`). Null counts as absent.
pub fn config_lookup<'a>(
    config: &'a serde_json::Value,
    key: &str,
) -> Option<&'a serde_json::Value> {
    let mut cur = config;
    for part in key.split('.') {
        cur = cur.get(part)?;
    }
    (!cur.is_null()).then_some(cur)
}

pub fn bind(
    spec: &Spec,
    config: &serde_json::Value,
    config_path: &str,
) -> Result<Bindings, BindError> {
    let decls: HashMap<&str, &ParamDecl> =
        spec.params.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut resolver = Resolver {
        spec,
        config,
        config_path,
        decls,
        done: HashMap::new(),
    };
    let mut values = Vec::new();
    for p in &spec.params {
        let v = resolver.resolve(&p.name)?;
        values.push((p.name.clone(), v.0, v.1));
    }
    let index = values
        .iter()
        .enumerate()
        .map(|(i, (n, _, _))| (n.clone(), i))
        .collect();
    let bindings = Bindings { values, index };
    for check in &spec.checks {
        let ok = eval_expr(
            spec,
            &check.expr,
            &|n| bindings.get(n).cloned(),
            "[[check]]",
        )?;
        if ok.truthy() != Some(true) {
            let used: Vec<String> = check
                .expr
                .expr
                .names()
                .into_iter()
                .map(|(n, _)| bindings.describe(n))
                .collect();
            return Err(BindError(format!(
                "{config_path}: {} ({}; check `{}` at {})",
                check.message,
                used.join(", "),
                check.expr.text,
                location(spec, &check.expr),
            )));
        }
    }
    Ok(bindings)
}

struct Resolver<'a> {
    spec: &'a Spec,
    config: &'a serde_json::Value,
    config_path: &'a str,
    decls: HashMap<&'a str, &'a ParamDecl>,
    done: HashMap<String, (Value, Origin)>,
}

impl Resolver<'_> {
    /// Resolves a parameter and, recursively, what it depends on. The
    /// validator has already rejected cycles.
    fn resolve(&mut self, name: &str) -> Result<(Value, Origin), BindError> {
        if let Some(v) = self.done.get(name) {
            return Ok(v.clone());
        }
        let decl = self.decls[name];
        let resolved = match &decl.source {
            ParamSource::Config { keys, default } => {
                match keys
                    .iter()
                    .find_map(|k| config_lookup(self.config, k).map(|v| (k, v)))
                {
                    Some((key, v)) => (Value::from_json(v), Origin::Config(key.clone())),
                    None => match default {
                        Some(e) => (self.eval_with_deps(e, name)?, Origin::Default),
                        None => {
                            let (line, _) = self.spec.source.line_col(decl.span.start);
                            return Err(BindError(format!(
                                "{}: missing key {} (needed for parameter `{name}`, {}:{line})",
                                self.config_path,
                                keys.iter()
                                    .map(|k| format!("`{k}`"))
                                    .collect::<Vec<_>>()
                                    .join(" or "),
                                self.spec.source.path,
                            )));
                        }
                    },
                }
            }
            ParamSource::Derived(e) => (self.eval_with_deps(e, name)?, Origin::Derived),
        };
        self.done.insert(name.to_string(), resolved.clone());
        Ok(resolved)
    }

    fn eval_with_deps(&mut self, e: &SpecExpr, param: &str) -> Result<Value, BindError> {
        for (dep, _) in e.expr.names() {
            if self.decls.contains_key(dep) {
                self.resolve(dep)?;
            }
        }
        let done = &self.done;
        eval_expr(
            self.spec,
            e,
            &|n| done.get(n).map(|(v, _)| v.clone()),
            &format!("parameter `{param}`"),
        )
    }
}

/// Evaluates a spec expression; errors point at the spec.
pub fn eval_expr(
    spec: &Spec,
    e: &SpecExpr,
    lookup: &dyn Fn(&str) -> Option<Value>,
    what: &str,
) -> Result<Value, BindError> {
    expr::eval(&e.expr, lookup).map_err(|err| {
        let (line, col) = spec.source.line_col(e.text_start + err.offset);
        BindError(format!(
            "{}:{line}:{col}: {what}: {} (in `{}`)",
            spec.source.path, err.message, e.text
        ))
    })
}

pub fn location(spec: &Spec, e: &SpecExpr) -> String {
    let (line, col) = spec.source.line_col(e.span.start);
    format!("{}:{line}:{col}", spec.source.path)
}
