//! The `tojson` filter as transformers defines it for chat templates:
//! Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`.
//!
//! minijinja's own `tojson` differs in ways a model sees: it escapes `<`,
//! `>`, `&` and `'` for HTML and writes `{"a":1}` where Python writes
//! `{"a": 1}`. Tool definitions rendered into a prompt must match the text
//! the model was trained on, so this follows Python's output byte for byte
//! for the values templates handle (strings, numbers, lists, maps).

use std::fmt::Write;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// `json.dumps` options.
struct Style {
    ensure_ascii: bool,
    /// Per-level indentation; `None` writes everything on one line.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// The filter: `x|tojson`, `x|tojson(indent=2)`, `x|tojson(separators=(",", ":"))`.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v)?),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair (item_separator, key_separator)",
                ))
            }
        },
        // Python drops the space after ',' when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = Style {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_value(&mut out, value, &style, 0)?;
    Ok(out)
}

fn write_value(out: &mut String, v: &Value, style: &Style, depth: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => write!(out, "{v}").expect("write to String"),
        ValueKind::Number => out.push_str(&float_repr(f64::try_from(v.clone())?)),
        ValueKind::String => write_str(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, style, depth, |out, item| {
                write_value(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let value = v.get_item(&key)?;
                entries.push((key_text(&key)?, value));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), &entries, style, depth, |out, (k, val)| {
                write_str(out, k, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_value(out, val, style, depth + 1)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// `[a, b]` or, with an indent, one item per line; empty containers stay
/// `[]`/`{}` as in Python.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &Style,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        write_item(out, item)?;
    }
    if !items.is_empty() {
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

/// Python converts str, int, float, bool and None keys to strings.
fn key_text(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => float_repr(f64::try_from(key.clone())?),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

/// A JSON string literal with Python's escapes: `\"`, `\\`, `\n`, `\r`,
/// `\t`, `\b`, `\f`, `\u00XX` for other control characters, and with
/// `ensure_ascii` every non-ASCII character as `\uXXXX` (UTF-16).
fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").expect("write to String");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, written
/// positionally for exponents -4..16 (with `.0` on whole numbers) and as
/// `1e-05`/`1.5e+16` otherwise; non-finite values as `NaN`/`Infinity`.
fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "1.5e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if (-4..16).contains(&exp) {
        let plain = format!("{x}");
        if plain.contains('.') {
            plain
        } else {
            plain + ".0"
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, ctx: Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(template, ctx).unwrap()
    }

    /// Map literals keep their order (minijinja's `preserve_order`), as
    /// Python dicts do.
    const TOOL: &str = r#"{% set tool = {"name": "get_weather", "description": "Temp <°C> & 'wind'\n", "parameters": {"type": "object", "required": ["city"], "n": 3, "f": 0.5, "e": [], "m": {}}} %}"#;

    #[test]
    fn matches_python_json_dumps() {
        let t = |expr: &str| render(&format!("{TOOL}{{{{ {expr} }}}}"), Value::UNDEFINED);
        // Outputs of CPython 3.12 `json.dumps` with the same options.
        assert_eq!(
            t("tool|tojson"),
            r#"{"name": "get_weather", "description": "Temp <°C> & 'wind'\n", "parameters": {"type": "object", "required": ["city"], "n": 3, "f": 0.5, "e": [], "m": {}}}"#
        );
        assert_eq!(
            t("tool.parameters|tojson(indent=2)"),
            "{\n  \"type\": \"object\",\n  \"required\": [\n    \"city\"\n  ],\n  \"n\": 3,\n  \"f\": 0.5,\n  \"e\": [],\n  \"m\": {}\n}"
        );
        assert_eq!(
            t("tool.description|tojson(ensure_ascii=true)"),
            r#""Temp <\u00b0C> & 'wind'\n""#
        );
        assert_eq!(
            t("tool.parameters|tojson(separators=[',', ':'], sort_keys=true)"),
            r#"{"e":[],"f":0.5,"m":{},"n":3,"required":["city"],"type":"object"}"#
        );
        assert_eq!(
            t("[true, none, undefined_name, {1: 2.0}]|tojson"),
            r#"[true, null, null, {"1": 2.0}]"#
        );
        assert_eq!(
            t("'\u{1}😀'|tojson(ensure_ascii=true)"),
            r#""\u0001\ud83d\ude00""#
        );
        let ctx = Value::from_serialize(serde_json::json!({"x": "a\"b\\c"}));
        assert_eq!(render("{{ x|tojson }}", ctx), r#""a\"b\\c""#);
    }

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1.5e300, "1.5e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, python) in cases {
            assert_eq!(float_repr(x), python, "{x}");
        }
    }
}
