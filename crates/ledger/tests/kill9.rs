//! Crash safety: a real `ledger-devnode` child process is killed with
//! SIGKILL while it produces blocks and transactions keep arriving; after a
//! restart on the same redb file, every transaction that was announced as
//! committed is still there, at the same place.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ledger::rpc_client::LedgerClient;
use ledger::types::TxLocation;
use ledger::{Call, Hash32, TOKEN};

const WAIT: Duration = Duration::from_secs(15);

fn spawn(dir: &std::path::Path, genesis: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledger-devnode"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--genesis",
            genesis.to_str().unwrap(),
        ])
        .args(["--rpc-addr", "127.0.0.1:0", "--block-time-ms", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("rpc listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, url)
}

/// Submits transfers from `sender` as fast as the node admits them, from
/// its next nonce on, until the node goes away; returns how many it submitted.
fn submit_forever(url: String, sender: ledger::Keypair) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = LedgerClient::connect(&url).await.unwrap();
        let chain_id = c.chain_info().await.unwrap().chain_id;
        let mut nonce = c.next_nonce(&sender.address()).await.unwrap();
        let to = key(2).address();
        let mut sent = 0;
        loop {
            let tx = ledger::Tx {
                signer: sender.address(),
                nonce,
                call: Call::Transfer { to, amount: TOKEN },
            }
            .sign(&sender, &chain_id);
            match c.submit(&tx).await {
                Ok(_) => {
                    nonce += 1;
                    sent += 1;
                }
                Err(_) => return sent,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_committed_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("genesis.toml");
    genesis(4).save(&gpath).unwrap();
    let data = dir.path().join("data");
    let mut committed: Vec<(Hash32, TxLocation)> = vec![];
    let mut last_height = 0;

    // Several crash/restart rounds: each kill lands at a random point of
    // the 10 ms sealing cycle while transactions keep arriving.
    for round in 0..3 {
        let (mut child, url) = spawn(&data, &gpath);
        let c = LedgerClient::connect(&url).await.unwrap();
        // Everything committed before any earlier kill is still there.
        let head = c.head().await.unwrap();
        assert!(
            head.header.height >= last_height,
            "round {round}: resumed at {} < {last_height}",
            head.header.height
        );
        for (h, loc) in &committed {
            assert_eq!(
                c.transaction(h).await.unwrap().as_ref(),
                Some(loc),
                "round {round}: tx {h} lost"
            );
        }
        let acct = c.account(&key(1).address()).await.unwrap();
        assert!(acct.nonce as usize >= committed.len());
        assert!(c.audit().await.unwrap().holds());

        let mut sub = c.subscribe_blocks().await.unwrap();
        let submitter = submit_forever(url.clone(), key(1));
        let target = committed.len() + 150;
        while committed.len() < target {
            let b = tokio::time::timeout(WAIT, sub.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            last_height = b.header.height;
            for (i, tx) in b.txs.iter().enumerate() {
                committed.push((
                    tx.hash(),
                    TxLocation {
                        height: b.header.height,
                        index: i as u32,
                    },
                ));
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let submitted = tokio::time::timeout(WAIT, submitter)
            .await
            .unwrap()
            .unwrap();
        assert!(submitted > 0);
    }

    // A final restart: all committed transactions, and the chain goes on.
    let (mut child, url) = spawn(&data, &gpath);
    let c = LedgerClient::connect(&url).await.unwrap();
    for (h, loc) in &committed {
        assert_eq!(
            c.transaction(h).await.unwrap().as_ref(),
            Some(loc),
            "tx {h} lost"
        );
    }
    let head = c.head().await.unwrap();
    let next = c.seal_block().await.unwrap();
    assert!(next.header.height > head.header.height);
    child.kill().unwrap();
    child.wait().unwrap();
}
