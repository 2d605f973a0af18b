//! The `hypertensor` binary as a user runs it.

use std::process::Command;

fn hypertensor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hypertensor"))
}

/// The fetched default model, or `None` after saying why the test is skipped.
fn default_model() -> Option<std::path::PathBuf> {
    let found = model::DEFAULT_MODEL.cached(&model::cache_dir());
    if found.is_none() {
        eprintln!("SKIPPED: default model not fetched; run `hypertensor model fetch`");
    }
    found
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let out = hypertensor()
        .args([
            "generate",
            "--model",
            "/nonexistent/x.gguf",
            "--prompt",
            "hi",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open model at /nonexistent/x.gguf"),
        "{err}"
    );
}

#[test]
fn generate_answers_with_the_default_model() {
    let Some(path) = default_model() else { return };
    let out = hypertensor()
        .args(["generate", "--temperature", "0", "--max-tokens", "16"])
        .args(["--prompt", "What is the capital of France?", "--model"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "The capital of France is Paris.\n"
    );
}

#[test]
fn chat_keeps_the_conversation_and_streams_answers() {
    let Some(path) = default_model() else { return };
    use std::io::Write;
    let mut child = hypertensor()
        .args([
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--model",
        ])
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"What is the capital of France?\n/reset\n/exit\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "The capital of France is Paris.\n"
    );
}

#[test]
fn bench_swarm_prints_and_writes_its_tables() {
    let Some(path) = default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("swarm.json");
    let out = hypertensor()
        .args(["bench", "swarm", "--servers", "2", "--clients", "1,2"])
        .args(["--rounds", "1", "--tokens", "4", "--model"])
        .arg(&path)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| 2 server(s): 0:15 + 15:30 |"), "{stdout}");
    assert!(stdout.contains("compute-only x 1 client"), "{stdout}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The local run, then the two servers relayed by the client and pushing.
    assert_eq!(written["decode"].as_array().unwrap().len(), 3);
    let concurrency = written["concurrency"].as_array().unwrap();
    let clients: Vec<_> = concurrency.iter().map(|c| c["clients"].clone()).collect();
    assert_eq!(clients, [1, 2]);
    assert_eq!(concurrency[0]["compute_ceiling"], 1.0);
    let ceiling = concurrency[1]["compute_ceiling"].as_f64().unwrap();
    assert!(ceiling.is_finite() && ceiling > 0.0, "{ceiling}");
}
