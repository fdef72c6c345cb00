//! Bad specs and bad configs give one clear message that points at the
//! spec (`file:line:col`) or names the config key.

use pie_archspec::{lower, parse};

const GOOD: &str = include_str!("../../specs/llama.toml");

fn spec_error(text: &str) -> String {
    match parse("specs/bad.toml", text) {
        Ok(_) => panic!("expected an error"),
        Err(d) => d.to_string(),
    }
}

fn config_error(config: serde_json::Value) -> String {
    let spec = parse("specs/llama.toml", GOOD).unwrap();
    lower(&spec, &config, "config.json")
        .unwrap_err()
        .to_string()
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128
    })
}

#[test]
fn misspelled_op_points_at_it_with_a_suggestion() {
    let text = GOOD.replacen("op = \"rms_norm\"", "op = \"rms_nrom\"", 1);
    let err = spec_error(&text);
    let line = text.lines().position(|l| l.contains("rms_nrom")).unwrap() + 1;
    let col = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"rms_nrom\"")
        .unwrap()
        + 1;
    let expected = format!(
        "specs/bad.toml:{line}:{col}: error: unknown op \"rms_nrom\" (did you mean `rms_norm`?)"
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("hint: known ops:"), "{err}");
}

#[test]
fn invalid_toml_is_located() {
    let err = spec_error("[arch]\nname = \"x\"\n[params\n");
    assert!(err.starts_with("specs/bad.toml:3:"), "{err}");
    assert!(err.contains("invalid TOML"), "{err}");
}

#[test]
fn unknown_parameter_in_expression() {
    let text = GOOD.replacen(
        "features = \"heads * head_dim\"",
        "features = \"heads * head_dmi\"",
        1,
    );
    let err = spec_error(&text);
    assert!(
        err.contains("unknown parameter `head_dmi` (did you mean `head_dim`?)"),
        "{err}"
    );
    let line = text.lines().position(|l| l.contains("head_dmi")).unwrap() + 1;
    let col = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("head_dmi")
        .unwrap()
        + 1;
    assert!(
        err.starts_with(&format!("specs/bad.toml:{line}:{col}:")),
        "{err}"
    );
}

#[test]
fn activation_read_before_written() {
    let text = GOOD.replacen(
        "{ op = \"glu\", gate = \"g\"",
        "{ op = \"glu\", gate = \"gg\"",
        1,
    );
    let err = spec_error(&text);
    assert!(
        err.contains("op `glu` reads `gg`, which no earlier op writes (did you mean `g`?)"),
        "{err}"
    );
}

#[test]
fn unknown_and_missing_op_keys() {
    let text = GOOD.replacen("eps = \"eps\" }", "epsilon = \"eps\" }", 1);
    let err = spec_error(&text);
    assert!(err.contains("op `rms_norm` has no key `epsilon`"), "{err}");
    assert!(err.contains("op `rms_norm` is missing `eps`"), "{err}");
}

#[test]
fn bad_expression_syntax() {
    let text = GOOD.replacen("\"heads * head_dim\"", "\"heads * \"", 1);
    let err = spec_error(&text);
    assert!(
        err.contains("invalid expression: expected an expression"),
        "{err}"
    );
}

#[test]
fn parameter_cycle() {
    let text = GOOD
        .replacen(
            "head_dim = { key = \"head_dim\", default = \"hidden / heads\" }",
            "head_dim = { expr = \"kv_heads * 2\" }\nkv_x = { expr = \"head_dim\" }",
            1,
        )
        .replacen(
            "kv_heads = { key = \"num_key_value_heads\", default = \"heads\" }",
            "kv_heads = { key = \"num_key_value_heads\", default = \"head_dim\" }",
            1,
        );
    let err = spec_error(&text);
    assert!(err.contains("depends on itself"), "{err}");
}

#[test]
fn missing_config_key_names_it() {
    let mut c = tiny_config();
    c.as_object_mut().unwrap().remove("num_attention_heads");
    let err = config_error(c);
    assert!(err.starts_with("config.json: missing key `num_attention_heads` (needed for parameter `heads`, specs/llama.toml:"), "{err}");
}

#[test]
fn failed_check_shows_values_and_keys() {
    let mut c = tiny_config();
    c["num_key_value_heads"] = 3.into();
    let err = config_error(c);
    assert!(err.contains("config.json: num_attention_heads must be a multiple of num_key_value_heads (heads=4 (config `num_attention_heads`), kv_heads=3 (config `num_key_value_heads`)"), "{err}");
}

#[test]
fn wrong_config_type() {
    let mut c = tiny_config();
    c["hidden_size"] = "big".into();
    let err = config_error(c);
    assert!(err.contains("hidden"), "{err}");
}

#[test]
fn unsupported_rope_scaling_type() {
    let mut c = tiny_config();
    c["rope_scaling"] = serde_json::json!({"rope_type": "wild", "factor": 2.0});
    let err = config_error(c);
    assert!(
        err.contains("rope scaling type `wild` is not supported"),
        "{err}"
    );
    assert!(err.contains("specs/llama.toml:"), "{err}");
}

#[test]
fn sequence_ops_are_refused_in_the_epilogue() {
    let text = GOOD.replacen(
        "  { op = \"rms_norm\", in = \"x\", out = \"x\", weight = \"model.norm.weight\", eps = \"eps\" },",
        "  { op = \"rope\", in = \"x\", out = \"x\", head_dim = \"hidden\", theta = \"rope_theta\" },",
        1,
    );
    let err = spec_error(&text);
    assert!(err.contains("op `rope` cannot be in the epilogue"), "{err}");
}

mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text(text in ".{0,400}") {
            let _ = pie_archspec::parse("fuzz.toml", &text);
        }

        /// Mutations of a real spec never panic the parser or the lowering.
        #[test]
        fn mutated_spec(pos in 0usize..5000, len in 0usize..20, insert in "[ -~]{0,12}") {
            let good = super::GOOD;
            let mut start = pos.min(good.len());
            while !good.is_char_boundary(start) { start -= 1; }
            let mut end = (start + len).min(good.len());
            while !good.is_char_boundary(end) { end -= 1; }
            let text = format!("{}{}{}", &good[..start], insert, &good[end..]);
            if let Ok(spec) = pie_archspec::parse("fuzz.toml", &text) {
                let _ = pie_archspec::lower(&spec, &super::tiny_config(), "config.json");
            }
        }

        /// Arbitrary expressions never panic the expression parser or evaluator.
        #[test]
        fn expressions(src in "[a-z0-9_ +*/%()<>=!&|?:.\\[\\]'-]{0,40}") {
            if let Ok(e) = pie_archspec::expr::parse(&src) {
                let _ = pie_archspec::expr::eval(&e, &|_| Some(pie_archspec::Value::Int(3)));
            }
        }
    }
}

fn lower_error(text: &str) -> String {
    let spec = parse("specs/bad.toml", text).unwrap_or_else(|d| panic!("{d}"));
    lower(&spec, &tiny_config(), "config.json")
        .unwrap_err()
        .to_string()
}

#[test]
fn kv_from_must_name_an_earlier_layer() {
    // Every layer reading layer 1's cache: layer 0 reads a later layer.
    let text = GOOD.replacen("k = \"k\", v = \"v\",", "kv_from = 1,", 1);
    let err = lower_error(&text);
    assert!(
        err.contains("(layer 0): `kv_from` = 1 must name an earlier layer"),
        "{err}"
    );
}

#[test]
fn attention_needs_k_and_v_without_kv_from() {
    let text = GOOD.replacen("k = \"k\", v = \"v\",", "k = \"k\",", 1);
    let err = lower_error(&text);
    assert!(err.contains("needs `k` and `v`"), "{err}");
}

#[test]
fn weight_name_placeholders_must_be_string_parameters() {
    let text = GOOD.replacen("\"model.embed_tokens.weight\"", "\"{hidden}.embed\"", 1);
    let err = lower_error(&text);
    assert!(
        err.contains("`{hidden}` is not a string parameter"),
        "{err}"
    );
}

#[test]
fn residual_width_is_checked_at_section_boundaries() {
    let text = GOOD.replacen(
        "[params]\n",
        "[params]\nresidual = { expr = \"2 * hidden\" }\n",
        1,
    );
    let err = lower_error(&text);
    assert!(
        err.contains("the prologue leaves `x` with width 64, expected 128"),
        "{err}"
    );
}
