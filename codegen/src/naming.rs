//! Rust identifiers for spec names.

use std::collections::HashSet;

/// `decoder` → `Decoder`, `sliding_decoder` → `SlidingDecoder`.
pub fn type_name(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// A field name for a weight: `self_attn.q_proj.weight` →
/// `self_attn_q_proj_weight`; `{i}`/`{e}` placeholders are dropped.
pub fn weight_field(weight_name: &str) -> String {
    let cleaned = weight_name.replace("{i}", "").replace("{e}", "e");
    let mut out = String::new();
    for c in cleaned.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_string();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        format!("w_{out}")
    } else {
        out
    }
}

/// Hands out unique identifiers within one struct.
#[derive(Default)]
pub struct Names(HashSet<String>);

impl Names {
    pub fn unique(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut n = 2;
        while !self.0.insert(name.clone()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        name
    }
}
