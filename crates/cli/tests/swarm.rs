//! The default model served by `hypertensor serve` processes on 127.0.0.1
//! and used by `hypertensor generate --initial-peers`: greedy output through
//! the swarm equals local output token for token, also when a server is
//! killed with SIGKILL mid-generation; eight clients at once all complete;
//! `hypertensor api` answers over the same swarm and its monitor shows it;
//! `hypertensor swarm --chain` runs it all with a dev chain whose epochs pay
//! the servers.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Killed, hypertensor, interrupt};

use p2p::{Multiaddr, NodeHandle};

const PROMPT: &str = "What is the capital of France?";
/// A prompt with a long answer, so the client is still generating when a
/// server is killed.
const STORY: &str = "Write a short story about a robot who learns to paint.";

fn default_model() -> Option<std::path::PathBuf> {
    let found = model::DEFAULT_MODEL.cached(&model::cache_dir());
    if found.is_none() {
        eprintln!("SKIPPED: default model not fetched; run `hypertensor model fetch`");
    }
    found
}

/// A bootstrap node in this process and server processes joined through it.
struct Swarm {
    runtime: tokio::runtime::Runtime,
    boot: NodeHandle,
    /// Each server with its peer id.
    servers: Vec<(Killed, String)>,
    model: std::path::PathBuf,
    cache: tempfile::TempDir,
}

impl Swarm {
    fn start(model: &Path, spans: &[&str]) -> Self {
        Self::start_with(model, spans, &[])
    }

    /// Servers given `args` besides their span.
    fn start_with(model: &Path, spans: &[&str], args: &[&str]) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let boot = runtime.block_on(p2p::testing::local_node(None));
        let cache = tempfile::tempdir().unwrap();
        let mut swarm = Self {
            runtime,
            boot,
            servers: Vec::new(),
            model: model.to_path_buf(),
            cache,
        };
        for (i, span) in spans.iter().enumerate() {
            // Each server its own identity (the default one is per cache dir).
            let key = swarm.cache.path().join(format!("server-{i}.key"));
            let mut child = hypertensor(swarm.cache.path())
                .arg("serve")
                .args(["--model", swarm.model.to_str().unwrap()])
                .args(["--model-id", "smollm2", "--blocks", span])
                .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--announce-period", "2"])
                .args(["--threads", "1", "--initial-peers", &swarm.boot_addr()])
                .args(["--identity", key.to_str().unwrap()])
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let serving = lines.next().unwrap().unwrap();
            let peer = serving.rsplit(' ').next().unwrap().to_string();
            // Keep reading, so the server never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            swarm.servers.push((Killed(child), peer));
        }
        let n = spans.len();
        swarm
            .runtime
            .block_on(p2p::testing::eventually(60, || async {
                let found = swarm.boot.find_servers("smollm2", 30).await.unwrap();
                let online = found
                    .iter()
                    .filter(|(_, i)| i.state == wire::ServerState::Online)
                    .count();
                (online == n).then_some(())
            }));
        swarm
    }

    fn boot_addr(&self) -> String {
        let addr: &Multiaddr = &self.boot.dialable_addrs()[0];
        addr.to_string()
    }

    /// `generate` through the swarm, greedy.
    fn client(&self, prompt: &str) -> Command {
        let mut c = generate(self.cache.path(), &self.model, prompt);
        c.args([
            "--model-id",
            "smollm2",
            "--initial-peers",
            &self.boot_addr(),
        ]);
        c
    }

    /// `hypertensor SUBCOMMAND` as a client of this swarm.
    fn command(&self, subcommand: &str) -> Command {
        let mut c = hypertensor(self.cache.path());
        c.args([subcommand, "--model", self.model.to_str().unwrap()])
            .args([
                "--model-id",
                "smollm2",
                "--initial-peers",
                &self.boot_addr(),
            ]);
        c
    }
}

/// Greedy `generate` of 40 tokens at most.
fn generate(cache: &Path, model: &Path, prompt: &str) -> Command {
    let mut c = hypertensor(cache);
    c.args(["generate", "--model", model.to_str().unwrap()])
        .args([
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ]);
    c
}

/// The answer of one process holding every block, given `args`.
fn local_answer(model: &Path, prompt: &str, args: &[&str]) -> String {
    let cache = tempfile::tempdir().unwrap();
    answer(generate(cache.path(), model, prompt).args(args))
}

/// What `command` prints, once it has succeeded.
fn answer(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn three_servers_answer_eight_clients_as_one_process_would() {
    let Some(model) = default_model() else { return };
    let want = local_answer(&model, PROMPT, &[]);
    assert!(want.contains("Paris"), "{want}");
    let swarm = Swarm::start(&model, &["0:10", "10:20", "20:30"]);

    assert_eq!(answer(&mut swarm.client(PROMPT)), want);

    let clients: Vec<_> = (0..8)
        .map(|_| {
            swarm
                .client(PROMPT)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Their decode steps meet in the servers' batches, whose float sums may
    // round differently in the last bit: every client completes with the
    // answer, not necessarily the same bytes.
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8(out.stdout).unwrap().contains("Paris"));
    }

    // The OpenAI-compatible API over the same swarm, and its monitor.
    let mut api = Killed(
        swarm
            .command("api")
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(api.0.stdout.take().unwrap()).lines();
    let listening = lines.next().unwrap().unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let addr = listening
        .strip_prefix("api listening on http://")
        .expect("the api prints its address");
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 40,
    });
    let (status, reply) = http(addr, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content}");
    let (status, state) = http(addr, "GET", "/api/v1/state", "");
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let model = &state["models"][0];
    assert_eq!(model["id"], "smollm2");
    assert_eq!(model["servers"].as_array().unwrap().len(), 3);
    assert_eq!(model["coverage"], serde_json::json!(vec![1; 30]));
}

#[test]
fn a_q8_swarm_answers_as_one_q8_process_would() {
    let Some(model) = default_model() else { return };
    // A prompt whose answer changes when the head keeps f32 activations
    // while the blocks round theirs.
    let prompt = "Write a short poem about the sea.";
    let want = local_answer(&model, prompt, &["--q8"]);
    let swarm = Swarm::start_with(&model, &["0:15", "15:30"], &["--q8"]);
    assert_eq!(answer(swarm.client(prompt).arg("--q8")), want);
}

/// One HTTP/1.1 exchange; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[test]
fn a_server_killed_mid_generation_is_replaced_without_changing_the_answer() {
    let Some(model) = default_model() else { return };
    let want = local_answer(&model, STORY, &[]);
    let mut swarm = Swarm::start(&model, &["0:15", "15:30", "15:30"]);

    let mut client = swarm
        .client(STORY)
        .args(["--log", "client=info"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(client.stderr.take().unwrap()).lines();
    let route = stderr
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("session opened"))
        .expect("the client logs its route");
    // route = "0:15@PEER, 15:30@PEER"
    let victim = route
        .split("15:30@")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_alphanumeric()).next())
        .expect("a server for 15:30")
        .to_string();
    let mut stdout = client.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    let (server, _) = swarm
        .servers
        .iter_mut()
        .find(|(_, peer)| *peer == victim)
        .expect("the victim is one of ours");
    server.0.kill().unwrap(); // SIGKILL: no goodbye

    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let log: Vec<String> = stderr.map_while(Result::ok).collect();
    assert!(client.wait().unwrap().success(), "{log:?}");
    let mut got = first.to_vec();
    got.extend(rest);
    assert_eq!(String::from_utf8(got).unwrap(), want);
    assert!(
        log.iter().any(|l| l.contains("session re-routed")),
        "no failover happened: {log:?}"
    );
}

#[test]
fn the_swarm_command_serves_the_api_and_stops_cleanly_on_ctrl_c() {
    let Some(model) = default_model() else { return };
    let cache = tempfile::tempdir().unwrap();
    let mut swarm = Killed(
        hypertensor(cache.path())
            .args(["swarm", "--servers", "3", "--listen", "127.0.0.1:0"])
            .args(["--model", model.to_str().unwrap()])
            .args(["--chain", "--epoch-blocks", "12", "--block-ms", "250"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(swarm.0.stdout.take().unwrap()).lines();
    let printed: Vec<String> = lines
        .by_ref()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("join:"))
        .collect();
    std::thread::spawn(move || lines.for_each(drop));
    assert_eq!(
        printed
            .iter()
            .filter(|l| l.starts_with("serving blocks"))
            .count(),
        3,
        "{printed:?}"
    );
    let addr = printed
        .iter()
        .find_map(|l| l.strip_prefix("chat:    http://"))
        .expect("the chat URL is printed")
        .trim_end_matches('/')
        .to_string();
    let (status, models) = http(&addr, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert!(models.contains("SmolLM2-135M-Instruct.Q4_1"), "{models}");
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 12,
    });
    let (status, reply) = http(&addr, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("Paris"), "{reply}");

    // With --chain the servers validate each other and get paid; the
    // monitor shows it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, state) = http(&addr, "GET", "/api/v1/state", "");
        assert_eq!(status, 200, "{state}");
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        let nodes = state["models"][0]["chain"]["nodes"].as_array().cloned();
        let nodes = nodes.unwrap_or_default();
        let paid = |n: &serde_json::Value| n["last_score"].as_u64().is_some_and(|s| s > 0);
        if nodes.len() == 3 && nodes.iter().all(paid) {
            assert!(nodes.iter().all(|n| n["class"] == "validator"), "{nodes:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no paid epoch shown: {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    interrupt(&swarm.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = swarm.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "swarm did not stop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}
