//! The wallet and dev-chain commands as a user runs them: keys, genesis, a
//! dev chain in a child process, a transfer, queries, and a refused transfer.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

fn hypertensor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hypertensor"));
    c.env("RUST_BACKTRACE", "0");
    c
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = hypertensor().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the chain process when the test ends, however it ends.
struct Chain(Child);

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn transfer_and_query_through_a_dev_chain() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (ok, out, err) = run(&["key", "new", "--out", &p("alice.key")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("address "));
    let (_, bob, _) = run(&["key", "new", "--out", &p("bob.key")]);
    let bob = bob
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("address ")
        .to_string();
    let fund = format!("{}=1000", p("alice.key"));
    let (ok, _, err) = run(&[
        "chain",
        "genesis",
        "--out",
        &p("genesis.toml"),
        "--fund",
        &fund,
    ]);
    assert!(ok, "{err}");

    let mut child = hypertensor()
        .args([
            "chain",
            "run",
            "--dev",
            "--genesis",
            &p("genesis.toml"),
            "--data-dir",
            &p("data"),
        ])
        .args(["--rpc-addr", "127.0.0.1:0", "--block-time-ms", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let chain = Chain(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("rpc listening on ")
        .expect(&line)
        .to_string();

    let (ok, _, err) = run(&[
        "tx",
        "transfer",
        "--rpc",
        &url,
        "--key",
        &p("alice.key"),
        "--to",
        &bob,
        "--amount",
        "2.5",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["query", "account", "--rpc", &url, "--address", &bob]);
    assert!(ok, "{err}");
    let account: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        account["account"]["balance"], "2500000000000000000",
        "{out}"
    );

    // Bob has only 2.5 tokens: the chain refuses, says why, and changes nothing.
    let (ok, _, err) = run(&[
        "tx",
        "transfer",
        "--rpc",
        &url,
        "--key",
        &p("bob.key"),
        "--to",
        &bob,
        "--amount",
        "100",
    ]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("insufficient"), "{err}");
    let (_, again, _) = run(&["query", "account", "--rpc", &url, "--address", &bob]);
    assert_eq!(again, out);
    drop(chain);
}
