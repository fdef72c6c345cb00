//! End to end with the Python chat inferlet (`inferlets/python/chat`,
//! compiled to a component by `inferlets/build_python.sh` through
//! componentize-py, which `inferlets/build.sh` runs) on the tiny llama
//! fixture: its greedy reply must equal `Engine::generate`'s, and a Python
//! exception must end that inferlet alone, with an error naming it, while
//! a Rust inferlet beside it completes. Python components import WASI p2,
//! which the runtime links with an empty sandbox.
//!
//! The Python chat component (about 18 MB) is compiled once for the tests;
//! a third test probes the WASI sandbox with `inferlets/python/sandbox`.

use std::sync::OnceLock;
use std::time::Instant;

use pie_runtime::inferlet::{Event, InferletRuntime, Limits};
use pie_runtime::scheduler::{Scheduler, SchedulerConfig};
use wasmtime::component::Component;

mod common;

use common::*;

/// One runtime and the compiled Python chat component, shared by the tests.
fn shared() -> &'static (InferletRuntime, Component) {
    static SHARED: OnceLock<(InferletRuntime, Component)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let cfg = SchedulerConfig {
            kv_pages: 256,
            ..SchedulerConfig::default()
        };
        let sched = Scheduler::start("llama", || Ok(engine()), cfg).unwrap();
        let rt = InferletRuntime::new(sched).unwrap();
        let wasm = std::fs::read(component_path("python_chat")).unwrap();
        let t = Instant::now();
        let chat = rt.compile(&wasm).unwrap();
        eprintln!(
            "python_chat.wasm: {} bytes compiled in {:.1} s",
            wasm.len(),
            t.elapsed().as_secs_f64()
        );
        (rt, chat)
    })
}

fn chat_args(prompt: &str, max_tokens: &str) -> Vec<String> {
    ["--prompt", prompt, "--max-tokens", max_tokens]
        .map(String::from)
        .to_vec()
}

#[test]
fn python_chat_matches_engine_greedy() {
    let expected = expected_reply(PROMPT);
    let (rt, chat) = shared();
    let t = Instant::now();
    let (events, status) = tokio().block_on(async {
        rt.launch(
            chat,
            chat_args(PROMPT, &MAX_TOKENS.to_string()),
            Limits::default(),
        )
        .wait()
        .await
    });
    eprintln!("python chat ran in {:.2} s", t.elapsed().as_secs_f64());
    status.unwrap_or_else(|e| panic!("{e}\nevents: {events:?}"));
    assert_eq!(messages(&events), vec![expected]);
}

#[test]
fn python_exception_fails_alone() {
    let expected = expected_reply(PROMPT);
    let (rt, py_chat) = shared();
    let rust_chat = rt
        .compile(&std::fs::read(component_path("chat")).unwrap())
        .unwrap();
    let ((bad_events, bad), (good_events, good)) = tokio().block_on(async {
        // `int("lots")` raises ValueError inside the Python inferlet.
        let bad = rt.launch(py_chat, chat_args(PROMPT, "lots"), Limits::default());
        let good = rt.launch(
            &rust_chat,
            chat_args(PROMPT, &MAX_TOKENS.to_string()),
            Limits::default(),
        );
        (bad.wait().await, good.wait().await)
    });
    let err = bad.expect_err("the Python inferlet must fail");
    assert!(
        err.contains("ValueError") && err.contains("lots"),
        "the error names the exception: {err}\nevents: {bad_events:?}"
    );
    assert!(
        err.contains("Traceback") && err.contains("app.py"),
        "with its traceback: {err}"
    );
    assert!(messages(&bad_events).is_empty(), "{bad_events:?}");
    assert_eq!(good, Ok(()));
    assert_eq!(messages(&good_events), vec![expected]);
}

/// What a Python inferlet reaches of the host through WASI: nothing. No
/// directory is visible, no file can be read or written, no environment
/// variable or argument leaks in, no socket connects (componentize-py's
/// CPython has no `socket` module, so the host's refusal of TCP, UDP and
/// every address is not reached from Python); what it prints reaches its
/// client as a log event.
#[test]
fn python_wasi_sandbox_grants_nothing() {
    let (rt, _) = shared();
    let probe = rt
        .compile(&std::fs::read(component_path("python_sandbox")).unwrap())
        .unwrap();
    let args = vec!["--probe".to_string()];
    let (events, status) =
        tokio().block_on(async { rt.launch(&probe, args, Limits::default()).wait().await });
    status.unwrap_or_else(|e| panic!("{e}\nevents: {events:?}"));
    let msgs = messages(&events);
    assert_eq!(msgs.len(), 1, "{events:?}");
    eprintln!("sandbox report: {}", msgs[0]);
    let report: serde_json::Value = serde_json::from_str(&msgs[0]).unwrap();
    let field = |k: &str| report[k].as_str().unwrap_or_default().to_string();
    for key in ["read_passwd", "write_tmp", "connect"] {
        assert!(field(key).starts_with("denied"), "{key}: {report}");
    }
    for key in ["listdir_root", "listdir_cwd"] {
        let v = field(key);
        assert!(v.starts_with("denied") || v == "ok: []", "{key}: {report}");
    }
    assert_eq!(report["environ"], serde_json::json!({}), "{report}");
    let argv = report["argv"].as_array().unwrap();
    assert!(
        argv.iter()
            .all(|a| a.as_str().unwrap_or_default().is_empty()),
        "no host arguments: {report}"
    );
    // The inferlet's own arguments come through `runtime.get-arguments`.
    assert_eq!(report["args"], serde_json::json!(["--probe"]));
    assert!(
        events.iter().any(|e| matches!(e, Event::Log { level: "info", text } if text == "hello from the sandbox probe")),
        "stdout becomes a log event: {events:?}"
    );
}
