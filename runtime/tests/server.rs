//! The HTTP server end to end on loopback with the tiny llama fixture:
//! OpenAI-shaped errors for bad input (the server keeps serving), greedy
//! completions equal to `Engine::generate`, streams equal to whole
//! responses, 256 concurrent streams, /metrics, and the inferlet
//! WebSocket with the real chat example.

use std::time::Duration;

use pie_driver_portable::PortableDriver;
use pie_runtime::sampling::Sampler;
use pie_runtime::scheduler::{Scheduler, SchedulerConfig};
use pie_runtime::server::client::{stream_choices, stream_text, Client};
use pie_runtime::server::{RunningServer, ServerOptions};
use pie_runtime::Engine;
use serde_json::{json, Value};

const MODEL: &str = "llama";

mod common;

use common::*;

/// A scheduler on the fixture and a server on 127.0.0.1, any port.
async fn start(opts: ServerOptions, kv_pages: usize) -> RunningServer {
    let cfg = SchedulerConfig {
        kv_pages,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(MODEL, || Ok(engine()), cfg).unwrap();
    RunningServer::start(sched, opts, "127.0.0.1:0")
        .await
        .unwrap()
}

fn options() -> ServerOptions {
    ServerOptions {
        model_id: MODEL.into(),
        ..ServerOptions::default()
    }
}

/// `Engine::generate`'s greedy tokens for prompt ids: the reply text
/// (stop token left out), the finish reason and the completion tokens.
struct Expected {
    text: String,
    finish: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

fn expected_for(e: &mut Engine<PortableDriver>, ids: Vec<u32>, max: usize) -> Expected {
    let prompt_tokens = ids.len();
    let mut out = e
        .generate(&[ids], max, &Sampler::greedy())
        .unwrap()
        .remove(0);
    let completion_tokens = out.len();
    let finish = match out.last().is_some_and(|t| e.stop_ids.contains(t)) {
        true => {
            out.pop();
            "stop"
        }
        false => "length",
    };
    Expected {
        text: e.tokenizer.as_ref().unwrap().decode(&out, true).unwrap(),
        finish,
        prompt_tokens,
        completion_tokens,
    }
}

/// The chat prompt as the server and the chat inferlet build it.
fn expected_chat(e: &mut Engine<PortableDriver>, prompt: &str, max: usize) -> Expected {
    let ids = chat_prompt_ids(e, prompt);
    expected_for(e, ids, max)
}

fn greedy(max: usize) -> Value {
    json!({"temperature": 0, "max_tokens": max})
}

fn error_of(resp: &pie_runtime::server::client::HttpResponse) -> (String, String, String) {
    let v = resp.json().unwrap();
    let e = &v["error"];
    (
        e["message"].as_str().unwrap().to_string(),
        e["type"].as_str().unwrap().to_string(),
        e["code"].as_str().unwrap().to_string(),
    )
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    tokio().block_on(async {
        let opts = ServerOptions {
            auth_token: Some("sekrit".into()),
            max_prompt_tokens: 40,
            ..options()
        };
        let server = start(opts, 256).await;
        let addr = server.addr.to_string();
        let anon = Client::new(addr.clone());
        let wrong = Client::new(addr.clone()).with_token("guess");
        let c = Client::new(addr.clone()).with_token("sekrit");
        let good = |c: Client| async move {
            let r = c.chat(MODEL, "hi", greedy(3)).await.unwrap();
            assert_eq!(r["object"], "chat.completion");
            assert!(r["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        };

        // Health needs no token; everything else does.
        assert_eq!(anon.get("/health").await.unwrap().status, 200);
        for (client, what) in [(&anon, "missing"), (&wrong, "invalid")] {
            for path in ["/v1/models", "/metrics"] {
                let r = client.get(path).await.unwrap();
                assert_eq!(r.status, 401, "{path}");
                let (msg, kind, _) = error_of(&r);
                assert_eq!(kind, "authentication_error");
                assert!(msg.contains(what), "{msg}");
            }
            let r = client
                .post_json("/v1/chat/completions", &json!({"model": MODEL}))
                .await
                .unwrap();
            assert_eq!(r.status, 401);
            assert!(client.websocket().await.is_err(), "WebSocket without token");
        }
        good(c.clone()).await;

        let chat = |body: &str| {
            let c = c.clone();
            let body = body.as_bytes().to_vec();
            async move {
                c.request("POST", "/v1/chat/completions", body)
                    .await
                    .unwrap()
            }
        };
        // Malformed JSON.
        let r = chat("{\"model\": \"llama\", \"messages\": [").await;
        assert_eq!(r.status, 400);
        let (msg, kind, code) = error_of(&r);
        assert_eq!((kind.as_str(), code.as_str()), ("invalid_request_error", "invalid_json"));
        assert!(msg.contains("malformed JSON"), "{msg}");
        assert_eq!(chat("").await.status, 400);
        good(c.clone()).await;

        // Missing fields, named.
        let r = chat(r#"{"model": "llama"}"#).await;
        assert_eq!(r.status, 400);
        let (msg, _, code) = error_of(&r);
        assert_eq!(code, "missing_field");
        assert!(msg.contains("`messages`"), "{msg}");
        let r = chat(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).await;
        assert_eq!(r.status, 400);
        assert!(error_of(&r).0.contains("`model`"));
        let r = c
            .post_json("/v1/completions", &json!({"model": MODEL}))
            .await
            .unwrap();
        assert_eq!(r.status, 400);
        assert!(error_of(&r).0.contains("`prompt`"));
        // A field of the wrong type.
        let r = chat(r#"{"model": "llama", "messages": "hi"}"#).await;
        assert_eq!(r.status, 400);
        good(c.clone()).await;

        // Unknown model.
        let r = chat(r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#).await;
        assert_eq!(r.status, 404);
        let (msg, kind, code) = error_of(&r);
        assert_eq!((kind.as_str(), code.as_str()), ("not_found_error", "model_not_found"));
        assert!(msg.contains("gpt-9") && msg.contains(MODEL), "{msg}");
        good(c.clone()).await;

        // A prompt over the limit names the limit and its length.
        let long = "the capital of France is Paris ".repeat(20);
        let r = c
            .post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": long, "max_tokens": 2}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400);
        let (msg, _, code) = error_of(&r);
        assert_eq!(code, "prompt_too_long");
        let ids = engine()
            .tokenizer
            .take()
            .unwrap()
            .encode(&long, true)
            .unwrap();
        assert!(
            msg.contains("40") && msg.contains(&ids.len().to_string()),
            "{msg} ({} tokens)",
            ids.len()
        );
        // Too many choices are refused, as are out-of-range sampling values.
        let r = chat(r#"{"model": "llama", "n": 17, "messages": [{"role": "user", "content": "hi"}]}"#)
            .await;
        assert_eq!(r.status, 400);
        assert!(error_of(&r).0.contains("n = 17"));
        let r = chat(
            r#"{"model": "llama", "temperature": 7, "messages": [{"role": "user", "content": "hi"}]}"#,
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(error_of(&r).0.contains("temperature"));
        // Unknown routes are JSON 404s too.
        let r = c.get("/v2/nothing").await.unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(error_of(&r).2, "unknown_route");

        // Still serving, streaming included; every page is back.
        good(c.clone()).await;
        let s = c
            .post_sse(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "Paris", "max_tokens": 3, "stream": true}),
            )
            .await
            .unwrap();
        assert_eq!(s.status, 200);
        let (_, finish, done) = stream_text(&s.collect().await.unwrap()).unwrap();
        assert!(finish.is_some() && done);
        let models = c.get("/v1/models").await.unwrap().json().unwrap();
        assert_eq!(models["data"][0]["id"], MODEL);
        let card = c.get("/v1/models/llama").await.unwrap();
        assert_eq!(card.json().unwrap()["id"], MODEL);
        let r = c.get("/v1/models/gpt-9").await.unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(error_of(&r).2, "model_not_found");
        wait_pages_free(&server).await;
        server.shutdown().await.unwrap();
    });
}

/// Contexts are released right after their last event: wait for it.
async fn wait_pages_free(server: &RunningServer) {
    let active = || {
        server
            .state
            .metrics
            .active_generations
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for _ in 0..200 {
        {
            let kv = server.state.sched.kv();
            if kv.free_pages() == kv.total_pages() && kv.num_contexts() == 0 && active() == 0 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kv = server.state.sched.kv();
    panic!(
        "{} of {} pages still held by {} contexts",
        kv.total_pages() - kv.free_pages(),
        kv.total_pages(),
        kv.num_contexts()
    );
}

#[test]
fn greedy_completions_match_the_engine_and_streams_match_whole_responses() {
    let mut e = engine();
    let chat_expected = expected_chat(&mut e, PROMPT, MAX_TOKENS);
    let prompt_ids = e
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France", true)
        .unwrap();
    let completion_expected = expected_for(&mut e, prompt_ids, 12);
    tokio().block_on(async {
        let server = start(options(), 256).await;
        let c = Client::new(server.addr.to_string());

        // Chat, whole.
        let r = c.chat(MODEL, PROMPT, greedy(MAX_TOKENS)).await.unwrap();
        let choice = &r["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], chat_expected.text.as_str());
        assert_eq!(choice["finish_reason"], chat_expected.finish);
        assert_eq!(r["usage"]["prompt_tokens"], chat_expected.prompt_tokens);
        assert_eq!(
            r["usage"]["completion_tokens"],
            chat_expected.completion_tokens
        );
        assert_eq!(
            r["usage"]["total_tokens"],
            chat_expected.prompt_tokens + chat_expected.completion_tokens
        );
        // max_completion_tokens is honored too.
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "max_completion_tokens": MAX_TOKENS});
        let r2 = c.post_json("/v1/chat/completions", &body).await.unwrap();
        assert_eq!(
            r2.json().unwrap()["choices"][0]["message"]["content"],
            chat_expected.text.as_str()
        );

        // Chat, streamed: the deltas concatenate to the whole text.
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let s = c.post_sse("/v1/chat/completions", &body).await.unwrap();
        assert_eq!(s.status, 200);
        let events = s.collect().await.unwrap();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let first: Value = serde_json::from_str(&events[0]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let (text, finish, done) = stream_text(&events).unwrap();
        assert!(done);
        assert_eq!(text, chat_expected.text);
        assert_eq!(finish.as_deref(), Some(chat_expected.finish));
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(
            usage["usage"]["completion_tokens"],
            chat_expected.completion_tokens
        );

        // Completions, whole and streamed.
        let body = json!({"model": MODEL, "prompt": "The capital of France",
            "temperature": 0, "max_tokens": 12});
        let r = c
            .post_json("/v1/completions", &body)
            .await
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["choices"][0]["text"], completion_expected.text.as_str());
        assert_eq!(r["choices"][0]["finish_reason"], completion_expected.finish);
        assert_eq!(
            r["usage"]["prompt_tokens"],
            completion_expected.prompt_tokens
        );
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let s = c.post_sse("/v1/completions", &sbody).await.unwrap();
        let (text, _, done) = stream_text(&s.collect().await.unwrap()).unwrap();
        assert!(done);
        assert_eq!(text, completion_expected.text);

        // A stop sequence from the middle of the reply cuts it there.
        let chars: Vec<char> = chat_expected.text.chars().collect();
        assert!(
            chars.len() >= 6,
            "reply too short: {:?}",
            chat_expected.text
        );
        {
            let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
            let cut = &chat_expected.text[..chat_expected.text.find(&stop).unwrap()];
            let mut extra = greedy(MAX_TOKENS);
            extra["stop"] = json!([stop]);
            let r = c.chat(MODEL, PROMPT, extra.clone()).await.unwrap();
            assert_eq!(r["choices"][0]["message"]["content"], cut);
            assert_eq!(r["choices"][0]["finish_reason"], "stop");
            let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                "stream": true});
            pie_runtime::server::client::merge(&mut body, extra);
            let s = c.post_sse("/v1/chat/completions", &body).await.unwrap();
            let (text, finish, _) = stream_text(&s.collect().await.unwrap()).unwrap();
            assert_eq!(text, cut);
            assert_eq!(finish.as_deref(), Some("stop"));
        }

        // Sampling with a seed is repeatable.
        let sampled = json!({"temperature": 0.9, "top_p": 0.95, "top_k": 40, "min_p": 0.01,
            "seed": 7, "max_tokens": 10});
        let a = c.chat(MODEL, PROMPT, sampled.clone()).await.unwrap();
        let b = c.chat(MODEL, PROMPT, sampled).await.unwrap();
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);

        // /metrics parses and counted the work.
        let m = c.get("/metrics").await.unwrap();
        assert_eq!(m.status, 200);
        let metrics = parse_metrics(&m.text());
        for name in [
            "pie_generated_tokens_total",
            "pie_batches_total",
            "pie_passes_total",
            "pie_batch_tokens_total",
            "pie_kv_pages_total",
            "pie_step_seconds_total",
            "pie_last_batch_tokens",
            "pie_generated_tokens_per_second",
            "pie_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
            "pie_requests_total{route=\"/v1/completions\",status=\"200\"}",
        ] {
            let v = metrics.iter().find(|(n, _)| n == name).map(|m| m.1);
            assert!(v.is_some_and(|v| v > 0.0), "{name} = {v:?}\n{}", m.text());
        }
        for name in ["pie_queue_depth", "pie_kv_pages_in_use"] {
            assert!(metrics.iter().any(|(n, _)| n == name), "{name}");
        }
        server.shutdown().await.unwrap();
    });
}

/// `(name with labels, value)` of every sample; panics on a line that is
/// not a comment or a sample.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l}"));
            (name.to_string(), v)
        })
        .collect()
}

#[test]
fn load_256_concurrent_streams_all_complete_correctly() {
    const N: usize = 256;
    const MAX: usize = 16;
    let prompts = [
        "What is the capital of France?",
        "Name a color.",
        "Count to five.",
        "Hello there, who are you?",
    ];
    let mut e = engine();
    let expected: Vec<Expected> = prompts
        .iter()
        .map(|p| expected_chat(&mut e, p, MAX))
        .collect();
    tokio().block_on(async {
        let server = start(options(), 2048).await;
        let c = Client::new(server.addr.to_string());
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let c = c.clone();
                let prompt = prompts[i % prompts.len()];
                tokio::spawn(async move {
                    let body = json!({"model": MODEL, "stream": true, "temperature": 0,
                        "max_tokens": MAX, "messages": [{"role": "user", "content": prompt}]});
                    let s = c.post_sse("/v1/chat/completions", &body).await?;
                    if s.status != 200 {
                        return Err(format!("status {}", s.status));
                    }
                    stream_text(&s.collect().await?)
                })
            })
            .collect();
        let mut ok = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let (text, finish, done) = t
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            let want = &expected[i % prompts.len()];
            assert!(done, "request {i} did not end with [DONE]");
            assert_eq!(text, want.text, "request {i}");
            assert_eq!(finish.as_deref(), Some(want.finish), "request {i}");
            ok += 1;
        }
        assert_eq!(ok, N);
        let elapsed = started.elapsed();
        let stats = server.state.sched.stats();
        let (passes, batches) = (
            stats.passes.load(std::sync::atomic::Ordering::Relaxed),
            stats.batches.load(std::sync::atomic::Ordering::Relaxed),
        );
        eprintln!("{N} streams in {elapsed:?}: {passes} passes in {batches} batches");
        assert!(
            batches * 8 < passes,
            "passes were batched: {batches} batches for {passes} passes"
        );
        let metrics = c.get("/metrics").await.unwrap().text();
        let line =
            format!("pie_requests_total{{route=\"/v1/chat/completions\",status=\"200\"}} {N}");
        assert!(metrics.contains(&line), "{metrics}");
        wait_pages_free(&server).await;
        server.shutdown().await.unwrap();
    });
}

#[test]
fn a_client_that_goes_away_frees_its_context() {
    tokio().block_on(async {
        let server = start(options(), 256).await;
        let c = Client::new(server.addr.to_string());
        let body = json!({"model": MODEL, "prompt": "Once upon a time", "stream": true,
            "temperature": 0.8, "seed": 1, "max_tokens": 2000});
        let mut s = c.post_sse("/v1/completions", &body).await.unwrap();
        assert_eq!(s.status, 200);
        assert!(s.next_data().await.unwrap().is_some());
        drop(s);
        wait_pages_free(&server).await;
        let generated = server
            .state
            .metrics
            .generated_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(generated < 2000, "generation went on: {generated} tokens");
        // And the server goes on.
        let r = c.chat(MODEL, "hi", greedy(2)).await.unwrap();
        assert_eq!(r["object"], "chat.completion");
        server.shutdown().await.unwrap();
    });
}

#[test]
fn several_choices_share_the_prompt_through_forks() {
    let expected = expected_chat(&mut engine(), PROMPT, MAX_TOKENS);
    tokio().block_on(async {
        let server = start(options(), 256).await;
        let c = Client::new(server.addr.to_string());
        // Greedy: every choice is the greedy reply.
        let mut extra = greedy(MAX_TOKENS);
        extra["n"] = json!(3);
        let r = c.chat(MODEL, PROMPT, extra.clone()).await.unwrap();
        let choices = r["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        for (i, ch) in choices.iter().enumerate() {
            assert_eq!(ch["index"], i);
            assert_eq!(ch["message"]["content"], expected.text.as_str());
            assert_eq!(ch["finish_reason"], expected.finish);
        }
        assert_eq!(r["usage"]["prompt_tokens"], expected.prompt_tokens);
        assert_eq!(
            r["usage"]["completion_tokens"],
            3 * expected.completion_tokens
        );
        // Streamed: each index concatenates to the same text.
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "stream": true});
        pie_runtime::server::client::merge(&mut body, extra);
        let s = c.post_sse("/v1/chat/completions", &body).await.unwrap();
        let events = s.collect().await.unwrap();
        assert_eq!(events.last().unwrap(), "[DONE]");
        let streamed = stream_choices(&events).unwrap();
        assert_eq!(streamed.len(), 3);
        for (text, finish) in &streamed {
            assert_eq!(text, &expected.text);
            assert_eq!(finish.as_deref(), Some(expected.finish));
        }
        // Sampled: choice 0 is what n = 1 gives with the same seed, and
        // whole and streamed responses agree choice by choice.
        let sampled = json!({"temperature": 1.0, "seed": 11, "max_tokens": 12});
        let one = c.chat(MODEL, PROMPT, sampled.clone()).await.unwrap();
        let mut four = sampled.clone();
        four["n"] = json!(4);
        let r = c.chat(MODEL, PROMPT, four.clone()).await.unwrap();
        assert_eq!(r["choices"][0]["message"], one["choices"][0]["message"]);
        let mut body = json!({"model": MODEL, "prompt": "Once upon a time", "stream": true});
        pie_runtime::server::client::merge(&mut body, four);
        let whole = c
            .post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "Once upon a time",
                "temperature": 1.0, "seed": 11, "max_tokens": 12, "n": 4}),
            )
            .await
            .unwrap()
            .json()
            .unwrap();
        let s = c.post_sse("/v1/completions", &body).await.unwrap();
        let streamed = stream_choices(&s.collect().await.unwrap()).unwrap();
        let texts: Vec<&str> = (0..4)
            .map(|i| whole["choices"][i]["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            streamed.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            texts
        );
        assert!(
            texts.iter().any(|t| *t != texts[0]),
            "four samples all equal: {texts:?}"
        );
        wait_pages_free(&server).await;
        server.shutdown().await.unwrap();
    });
}

fn component(name: &str) -> Vec<u8> {
    std::fs::read(component_path(name)).unwrap()
}

#[test]
fn websocket_runs_the_chat_inferlet_and_refuses_invalid_wasm() {
    let expected = expected_chat(&mut engine(), PROMPT, MAX_TOKENS);
    tokio().block_on(async {
        let opts = ServerOptions {
            auth_token: Some("sekrit".into()),
            ..options()
        };
        let server = start(opts, 256).await;
        let c = Client::new(server.addr.to_string()).with_token("sekrit");
        let mut ws = c.websocket().await.unwrap();
        let t = Duration::from_secs(60);

        // Not a component, as a binary frame and as base64.
        let err = ws.upload(b"\0asm not really".to_vec()).await.unwrap_err();
        assert!(err.contains("not a valid inferlet component"), "{err}");
        ws.send_json(&json!({"type": "upload", "id": 1, "wasm_base64": "AGFzbQEAAAA="}))
            .await
            .unwrap();
        let v = ws.recv(t).await.unwrap();
        assert_eq!(
            (v["type"].as_str(), v["id"].as_i64()),
            (Some("error"), Some(1))
        );
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("not a valid inferlet component"),
            "{v}"
        );
        // Malformed and unknown requests.
        ws.send_json(&json!({"type": "dance", "id": 2}))
            .await
            .unwrap();
        let v = ws.recv(t).await.unwrap();
        assert_eq!(v["type"], "error");
        assert!(v["message"].as_str().unwrap().contains("dance"), "{v}");
        ws.send_json(&json!({"type": "launch", "id": 3, "program": "abc"}))
            .await
            .unwrap();
        let v = ws.recv(t).await.unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("no program abc"),
            "{v}"
        );

        // The same socket still works: the real chat example.
        let program = ws.upload(component("chat")).await.unwrap();
        assert_eq!(program.len(), 64);
        let max = MAX_TOKENS.to_string();
        let instance = ws
            .launch(&program, &["--prompt", PROMPT, "--max-tokens", &max])
            .await
            .unwrap();
        let run = ws.wait(instance, t).await.unwrap();
        assert_eq!(run.status, Ok(()));
        assert_eq!(run.messages, vec![expected.text.clone()]);
        // The program stays uploaded: a second connection launches it by id,
        // and an inferlet's failure is reported as its exit.
        let mut ws2 = c.websocket().await.unwrap();
        let instance = ws2.launch(&program, &[]).await.unwrap();
        let run = ws2.wait(instance, t).await.unwrap();
        assert!(run.status.unwrap_err().contains("--prompt"));
        // Messages to an instance reach its `receive`; a trap is its exit.
        let faulty = ws2.upload(component("faulty")).await.unwrap();
        let echo = ws2.launch(&faulty, &["echo"]).await.unwrap();
        ws2.send_json(&json!({"type": "send", "id": "s1", "instance": echo, "message": "hello"}))
            .await
            .unwrap();
        let (mut sent, mut echoed) = (false, false);
        while !(sent && echoed) {
            let v = ws2.recv(t).await.unwrap();
            match v["type"].as_str() {
                Some("sent") => sent = v["id"] == "s1",
                Some("message") => {
                    assert_eq!(
                        (v["instance"].as_u64(), v["message"].as_str()),
                        (Some(echo), Some("echo: hello"))
                    );
                    echoed = true;
                }
                other => panic!("unexpected {other:?}: {v}"),
            }
        }
        ws2.send_json(&json!({"type": "send", "instance": 999, "message": "x"}))
            .await
            .unwrap();
        let v = ws2.recv(t).await.unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("no instance 999"),
            "{v}"
        );
        let trap = ws2.launch(&faulty, &["trap"]).await.unwrap();
        let run = ws2.wait(trap, t).await.unwrap();
        assert!(run.status.unwrap_err().contains("trapped"));
        assert!(
            run.logs.iter().any(|l| l.contains("trapping on purpose")),
            "the panic message reaches the client as a log: {:?}",
            run.logs
        );
        ws2.close().await;
        ws.close().await;
        wait_pages_free(&server).await;
        server.shutdown().await.unwrap();
    });
}

#[test]
fn incremental_detokenization_concatenates_to_the_full_decode() {
    use pie_runtime::server::detokenize::Detokenizer;
    let tok = engine().tokenizer.take().unwrap();
    let vocab = tok.vocab_size() as u64;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..200 {
        let len = 1 + round % 40;
        let ids: Vec<u32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % vocab) as u32
            })
            .collect();
        let mut d = Detokenizer::new();
        let mut text = String::new();
        for &id in &ids {
            text += &d.push(&tok, id).unwrap();
        }
        text += &d.flush(&tok).unwrap();
        assert_eq!(text, tok.decode(&ids, true).unwrap(), "ids {ids:?}");
    }
}
