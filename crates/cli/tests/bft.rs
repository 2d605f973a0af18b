//! Four BFT validators as real processes on 127.0.0.1, run the way a user
//! runs them (`hypertensor chain run --validator-key ...`). One is killed
//! with SIGKILL mid-run; the other three keep finalizing; restarted, it
//! catches up to the same blocks and state roots, and every transaction
//! submitted (through different validators) is committed exactly once.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ledger::rpc_client::LedgerClient;
use ledger::{Address, Call, Hash32, Keypair, TOKEN, Tx};

fn hypertensor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hypertensor"));
    c.env("RUST_BACKTRACE", "0");
    c
}

fn run(args: &[&str]) {
    let out = hypertensor().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the validator process when dropped, however the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Net {
    dir: PathBuf,
    keys: Vec<Keypair>,
    ports: Vec<u16>,
}

impl Net {
    fn key_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("v{i}.key"))
    }

    fn start(&self, i: usize) -> (Proc, String) {
        let peers: Vec<String> = (0..self.keys.len())
            .filter(|j| *j != i)
            .map(|j| format!("{}@127.0.0.1:{}", self.keys[j].address(), self.ports[j]))
            .collect();
        let mut child = hypertensor()
            .args(["chain", "run", "--validator-key"])
            .arg(self.key_path(i))
            .arg("--genesis")
            .arg(self.dir.join("genesis.toml"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("data{i}")))
            .args(["--p2p-addr", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--rpc-addr", "127.0.0.1:0", "--peers", &peers.join(",")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let proc = Proc(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("rpc listening on ")
            .unwrap_or_else(|| panic!("validator {i} did not start: {line:?}"))
            .to_string();
        (proc, url)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn height(url: &str) -> u64 {
    match LedgerClient::connect(url).await {
        Ok(c) => c.head().await.map(|h| h.header.height).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn wait_height(urls: &[&str], h: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut low = u64::MAX;
        for u in urls {
            low = low.min(height(u).await);
        }
        if low >= h {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stuck below height {h} (lowest {low})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn transfers(url: &str, key: &Keypair, chain_id: &str, n: u64) -> Vec<Hash32> {
    let c = LedgerClient::connect(url).await.unwrap();
    let base = c.next_nonce(&key.address()).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let tx = Tx {
            signer: key.address(),
            nonce: base + i,
            call: Call::Transfer {
                to: Address([5; 32]),
                amount: TOKEN,
            },
        }
        .sign(key, chain_id);
        out.push(c.submit(&tx).await.unwrap());
    }
    out
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_survive_kill_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate()).collect();
    for (i, k) in keys.iter().enumerate() {
        k.save(&dir.join(format!("v{i}.key"))).unwrap();
    }
    let users: Vec<Keypair> = (0..3).map(|_| Keypair::generate()).collect();
    let mut args: Vec<String> = vec![
        "chain".into(),
        "genesis".into(),
        "--out".into(),
        path(&dir.join("genesis.toml")),
        "--chain-id".into(),
        "bft-test".into(),
        "--chain-epoch-blocks".into(),
        "20".into(),
    ];
    for i in 0..4 {
        args.push("--validator".into());
        args.push(format!("{}=100", path(&dir.join(format!("v{i}.key")))));
    }
    for u in &users {
        args.push("--fund".into());
        args.push(format!("{}=1000", u.address()));
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let net = Net {
        dir,
        keys,
        ports: (0..4).map(|_| free_port()).collect(),
    };

    let mut procs: Vec<Option<Proc>> = Vec::new();
    let mut urls = Vec::new();
    for i in 0..4 {
        let (p, u) = net.start(i);
        procs.push(Some(p));
        urls.push(u);
    }
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    wait_height(&all, 3, Duration::from_secs(60)).await;

    let chain_id = "bft-test";
    let mut hashes = Vec::new();
    hashes.extend(transfers(&urls[1], &users[0], chain_id, 5).await);

    // SIGKILL validator 3 mid-run; the others keep finalizing.
    procs[3].take();
    hashes.extend(transfers(&urls[0], &users[1], chain_id, 5).await);
    let h = height(&urls[0]).await;
    wait_height(&all[..3], h + 15, Duration::from_secs(90)).await;
    hashes.extend(transfers(&urls[2], &users[2], chain_id, 5).await);

    // Restart it on the same data directory: it catches up.
    let (p, url3) = net.start(3);
    procs[3] = Some(p);
    urls[3] = url3;
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    let target = height(&urls[0]).await + 5;
    wait_height(&all, target, Duration::from_secs(120)).await;

    // Same blocks and state roots everywhere up to the target, and every
    // transaction committed exactly once.
    let clients: Vec<LedgerClient> = {
        let mut v = Vec::new();
        for u in &all {
            v.push(LedgerClient::connect(u).await.unwrap());
        }
        v
    };
    let mut seen: BTreeMap<Hash32, u32> = BTreeMap::new();
    for h in 0..=target {
        let b0 = clients[0].block(Some(h)).await.unwrap().unwrap();
        for c in &clients[1..] {
            let b = c.block(Some(h)).await.unwrap().unwrap();
            assert_eq!(b.hash(), b0.hash(), "validators differ at height {h}");
            assert_eq!(b.header.state_root, b0.header.state_root);
        }
        for t in &b0.txs {
            *seen.entry(t.hash()).or_default() += 1;
        }
    }
    for h in &hashes {
        assert_eq!(
            seen.get(h),
            Some(&1),
            "transaction {h} not committed exactly once"
        );
    }
    for u in &users {
        for c in &clients {
            assert_eq!(c.account(&u.address()).await.unwrap().nonce, 5);
        }
    }
    let audit = clients[3].audit().await.unwrap();
    assert!(audit.holds());
}
