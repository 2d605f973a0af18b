//! `hypertensor api` as a user runs it, checked from outside: the official
//! `openai` Python package and a headless Chromium on the web chat.
//!
//! These need the default model (skipped with a printed reason when it is not
//! fetched, like the other default-model tests), a Python with the `openai`
//! and `websocket-client` packages (`HYPERTENSOR_PYTHON`, default `python3`)
//! and Chromium (`HYPERTENSOR_CHROMIUM`, default `chromium`). A missing Python
//! package or browser FAILS the test, so CI cannot pass without running them,
//! unless `HYPERTENSOR_SKIP_PYTHON=1` / `HYPERTENSOR_SKIP_BROWSER=1` says to
//! skip. scripts/test.sh installs all of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The fetched default model, or `None` after saying why the test is skipped.
fn default_model() -> Option<PathBuf> {
    let found = model::DEFAULT_MODEL.cached(&model::cache_dir());
    if found.is_none() {
        eprintln!("SKIPPED: default model not fetched; run `hypertensor model fetch`");
    }
    found
}

fn python() -> String {
    std::env::var("HYPERTENSOR_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../api/tests")
        .join(name)
}

/// Whether the tool is usable; when it is not, panics unless `skip_var` is 1.
fn require(what: &str, ok: bool, skip_var: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var(skip_var).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: {what} is missing and {skip_var}=1");
        return false;
    }
    panic!(
        "{what} is missing. Run scripts/test.sh (it installs Chromium and a venv with \
         `openai` and `websocket-client`, and sets HYPERTENSOR_PYTHON), or set {skip_var}=1 \
         to skip this test"
    );
}

fn python_has(modules: &str) -> bool {
    Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn chromium_present() -> bool {
    let exe = std::env::var("HYPERTENSOR_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    Command::new(exe)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `hypertensor api`; killed if the test fails before stopping it.
struct Api {
    child: Option<Child>,
    url: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the server on an OS-assigned port and waits for its
/// "listening" line.
fn start(model: &Path) -> Api {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypertensor"))
        .args(["api", "--listen", "127.0.0.1:0", "--model"])
        .arg(model)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("api exited before listening").unwrap();
    let url = first
        .strip_prefix("api listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_string();
    let monitor = lines.next().unwrap().unwrap();
    assert_eq!(monitor, format!("monitor at {url}/monitor"));
    Api {
        child: Some(child),
        url,
    }
}

/// Runs a test script against the server; its stdout on success.
fn run_script(name: &str, url: &str) -> String {
    let out = Command::new(python())
        .arg(script(name))
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Sends Ctrl-C's signal and waits for a clean exit.
fn interrupt(mut api: Api) {
    let mut child = api.child.take().unwrap();
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(status.success());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait()));
    let Ok(exit) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("api did not stop within 60 s of SIGINT");
    };
    let exit = exit.unwrap();
    assert!(exit.success(), "api exited with {exit}");
}

#[test]
fn the_openai_python_client_works_against_the_api() {
    let Some(model) = default_model() else { return };
    let ok = require(
        &format!("{} with the `openai` package", python()),
        python_has("openai"),
        "HYPERTENSOR_SKIP_PYTHON",
    );
    if !ok {
        return;
    }
    let api = start(&model);
    let out = run_script("openai_client.py", &api.url);
    let result: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(result["model"], "SmolLM2-135M-Instruct.Q4_1");
    // Greedy, as `hypertensor generate --temperature 0` answers.
    assert_eq!(result["answer"], "The capital of France is Paris.");
    interrupt(api);
}

#[test]
fn the_web_chat_streams_an_answer_in_a_real_browser() {
    let Some(model) = default_model() else { return };
    let ok = require(
        &format!("{} with the `websocket` package", python()),
        python_has("websocket"),
        "HYPERTENSOR_SKIP_BROWSER",
    ) && require("chromium", chromium_present(), "HYPERTENSOR_SKIP_BROWSER");
    if !ok {
        return;
    }
    let api = start(&model);
    let out = run_script("browser_chat.py", &api.url);
    let result: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        result["answer"].as_str().unwrap().contains("Paris"),
        "{result}"
    );
}
