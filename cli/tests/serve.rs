//! `pie serve` as a user runs it: it prints its address, answers over
//! HTTP, stops on SIGINT; a config with an unknown key is refused naming it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama")
}

/// One HTTP/1.1 request with `Connection: close`; the whole response.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_prints_its_address_answers_and_stops_on_sigint() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pie"))
        .args(["serve", "--model"])
        .arg(llama())
        .args(["--port", "0", "--max-prompt-tokens", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(line.contains("model `llama`"), "{line}");
    let health = http(&addr, "GET", "/health", "");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = r#"{"model": "llama", "prompt": "Paris", "max_tokens": 3, "temperature": 0}"#;
    let resp = http(&addr, "POST", "/v1/completions", body);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"text_completion\""), "{resp}");
    // The shell's `kill`: no procps needed.
    let status = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn serve_refuses_a_config_with_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pie.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\npath = {:?}\n[server]\nprot = 8080\n",
            llama().display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pie"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field `prot`") && err.contains("pie.toml:4:1"),
        "{err}"
    );
}
