//! `hypertensor keygen` and `hypertensor serve` as real processes on
//! 127.0.0.1: two servers, one with fixed blocks and one placed by the swarm,
//! together cover a tiny model, a third from the first one's key file is
//! refused; a clean Ctrl-C announces Offline.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Killed, hypertensor, interrupt};

use candle_core::quantized::GgmlDType;
use p2p::{Keypair, Multiaddr, Node, NodeConfig};
use wire::ServerState;

/// Starts `serve` and reads its announced span and first TCP address.
fn serve(cache: &Path, args: &[&str]) -> (Killed, String, Multiaddr) {
    let mut child = hypertensor(cache)
        .arg("serve")
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--announce-period", "1"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = lines.next().unwrap().unwrap();
    let addr = lines.next().unwrap().unwrap();
    let addr = addr.strip_prefix("listening on ").unwrap().parse().unwrap();
    (Killed(child), serving, addr)
}

#[test]
fn keygen_writes_a_persistent_identity() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id.key");
    let out = hypertensor(dir.path())
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let loaded = p2p::identity::load(&key).unwrap();
    assert_eq!(printed.trim(), loaded.public().to_peer_id().to_string());
    let again = hypertensor(dir.path())
        .args(["keygen", "--out", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
}

#[test]
fn serve_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    model::testing::write_gguf(&model, 4, GgmlDType::Q4_0);
    let m = model.to_str().unwrap();
    for (args, message) in [
        (vec!["--model", m, "--blocks", "0:2"], "--initial-peers"),
        (
            vec!["--model", m, "--new-swarm", "--blocks", "3:2"],
            "START must be below END",
        ),
        (
            vec!["--model", m, "--new-swarm", "--blocks", "2:9"],
            "not within the model's 4 blocks",
        ),
        (vec!["--model", m, "--new-swarm"], "--num-blocks"),
    ] {
        let out = hypertensor(dir.path())
            .arg("serve")
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

#[test]
fn two_server_processes_cover_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    model::testing::write_gguf(&model, 4, GgmlDType::Q4_0);
    let m = model.to_str().unwrap();
    let key = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (mut first, serving, addr) = serve(
        dir.path(),
        &[
            "--model",
            m,
            "--model-id",
            "tiny",
            "--new-swarm",
            "--blocks",
            "0:2",
            "--identity",
            &key("a.key"),
        ],
    );
    assert!(
        serving.starts_with("serving blocks 0:2 of tiny as "),
        "{serving}"
    );
    // A second server from the same key file would share its peer id.
    let twin = hypertensor(dir.path())
        .arg("serve")
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--model", m])
        .args(["--blocks", "2:4", "--identity", &key("a.key")])
        .args(["--initial-peers", &addr.to_string()])
        .output()
        .unwrap();
    assert!(!twin.status.success());
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(err.contains("in use by another running peer"), "{err}");
    // So would a client that names the file as its identity.
    let client = hypertensor(dir.path())
        .args(["generate", "--model", m, "--prompt", "Hi"])
        .args(["--client-identity", &key("a.key")])
        .args(["--initial-peers", &addr.to_string()])
        .output()
        .unwrap();
    assert!(!client.status.success());
    let err = String::from_utf8_lossy(&client.stderr);
    assert!(err.contains("in use by another running peer"), "{err}");
    let (_second, serving, _) = serve(
        dir.path(),
        &[
            "--model",
            m,
            "--model-id",
            "tiny",
            "--num-blocks",
            "2",
            "--identity",
            &key("b.key"),
            "--initial-peers",
            &addr.to_string(),
        ],
    );
    assert!(
        serving.starts_with("serving blocks 2:4 of tiny"),
        "{serving}"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = NodeConfig::local();
        config.initial_peers = vec![addr.clone()];
        let client = Node::start(Keypair::generate_ed25519(), config)
            .await
            .unwrap();
        let first_peer = loop {
            let found = client.find_servers("tiny", 4).await.unwrap();
            if found.len() == 2 {
                break found.iter().find(|(_, i)| i.span.start == 0).unwrap().0;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Ctrl-C: the server announces Offline before it exits.
        interrupt(&first.0);
        assert!(first.0.wait().unwrap().success());
        loop {
            if let Some(info) = client.server_info(&first_peer).await.unwrap()
                && info.state == ServerState::Offline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn serve_exposes_prometheus_metrics() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    model::testing::write_gguf(&model, 4, GgmlDType::Q4_0);
    let mut child = hypertensor(dir.path())
        .arg("serve")
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--new-swarm"])
        .args(["--model", model.to_str().unwrap(), "--blocks", "1:3"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _child = Killed(child);
    let url = lines
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("metrics on http://").map(str::to_string))
        .expect("serve prints the metrics address");
    let addr = url.strip_suffix("/metrics").unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(page.contains("application/openmetrics-text"), "{page}");
    for line in [
        "hypertensor_server_span_start 1",
        "hypertensor_server_span_end 3",
        "hypertensor_server_sessions_active 0",
        "hypertensor_server_cache_tokens 65536",
    ] {
        assert!(page.contains(line), "missing {line:?} in\n{page}");
    }
}
