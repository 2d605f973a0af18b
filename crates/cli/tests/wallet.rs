//! The wallet commands (`key`, `chain genesis`, `tx`, `query`) run as the
//! real binary against an in-process dev node.

use std::process::Command;
use std::time::Duration;

use ledger::devnode::{DevNode, DevNodeConfig};
use ledger::rpc_client::LedgerClient;
use ledger::{Genesis, Keypair, TOKEN};

/// Runs `hypertensor ARGS`; a failure carries the command's stderr.
fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_hypertensor"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr))
    }
}

#[test]
fn bad_arguments_are_named() {
    let e = run(&[
        "tx", "transfer", "--to", "zz", "--amount", "1", "--key", "k",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("--to"), "{e}");
    let e = run(&["chain", "run", "--genesis", "/nonexistent.toml"]).unwrap_err();
    assert!(e.to_string().contains("--dev"), "{e}");
}

#[test]
fn wallet_commands_against_a_dev_node() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (alice, bob) = (p("alice.json"), p("bob.json"));
    run(&["key", "new", "--out", &alice]).unwrap();
    run(&["key", "new", "--out", &bob]).unwrap();
    assert!(
        run(&["key", "new", "--out", &alice]).is_err(),
        "never overwrites"
    );
    run(&["key", "show", "--key", &alice]).unwrap();
    let a = Keypair::load(std::path::Path::new(&alice)).unwrap();
    let b = Keypair::load(std::path::Path::new(&bob)).unwrap();

    let gfile = p("genesis.toml");
    let fund_a = format!("{alice}=1000");
    let fund_b = format!("{}=2.5", b.address());
    run(&[
        "chain",
        "genesis",
        "--out",
        &gfile,
        "--chain-id",
        "cli-test",
        "--fund",
        &fund_a,
        "--fund",
        &fund_b,
    ])
    .unwrap();
    let g = Genesis::load(std::path::Path::new(&gfile)).unwrap();
    assert_eq!(g.balances[0].amount, 1000 * TOKEN);
    assert_eq!(g.balances[1].amount, 5 * TOKEN / 2);

    // The node runs on its own runtime; the CLI makes its own.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = rt
        .block_on(DevNode::start(DevNodeConfig {
            data_dir: None,
            genesis: g,
            rpc_addr: "127.0.0.1:0".parse().unwrap(),
            block_time: Some(Duration::from_millis(20)),
        }))
        .unwrap();
    let url = node.rpc_url();
    let tx = |extra: &[&str], key: &str| {
        let mut args = vec!["tx"];
        args.extend_from_slice(&extra[..1]);
        args.extend_from_slice(&["--rpc", &url, "--key", key]);
        args.extend_from_slice(&extra[1..]);
        run(&args)
    };
    let bob_addr = b.address().to_string();
    tx(&["transfer", "--to", &bob_addr, "--amount", "1.5"], &alice).unwrap();
    let err = tx(&["transfer", "--to", &bob_addr, "--amount", "5000"], &alice).unwrap_err();
    assert!(
        format!("{err:#}").contains("insufficient balance"),
        "{err:#}"
    );
    tx(
        &[
            "register-subnet",
            "--name",
            "smol",
            "--min-stake",
            "1",
            "--max-stake",
            "100",
        ],
        &alice,
    )
    .unwrap();
    for i in 0..3 {
        let cold = p(&format!("cold{i}.json"));
        run(&["key", "new", "--out", &cold]).unwrap();
        tx(
            &[
                "transfer",
                "--to",
                &Keypair::load(std::path::Path::new(&cold))
                    .unwrap()
                    .address()
                    .to_string(),
                "--amount",
                "20",
            ],
            &alice,
        )
        .unwrap();
        let peer = format!("peer{i}");
        tx(
            &[
                "register-node",
                "--subnet",
                "1",
                "--peer-id",
                &peer,
                "--stake",
                "5",
            ],
            &cold,
        )
        .unwrap();
    }
    let err = tx(
        &[
            "register-node",
            "--subnet",
            "1",
            "--peer-id",
            "peer0",
            "--stake",
            "5",
        ],
        &bob,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("duplicate peer id"), "{err:#}");
    let err = tx(
        &[
            "register-node",
            "--subnet",
            "1",
            "--peer-id",
            "peerb",
            "--stake",
            "500",
        ],
        &bob,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("stake out of range"), "{err:#}");
    tx(&["activate-subnet", "--subnet", "1"], &alice).unwrap();
    let cold0 = p("cold0.json");
    tx(
        &["stake", "--subnet", "1", "--node", "1", "--amount", "2"],
        &cold0,
    )
    .unwrap();
    tx(
        &["unstake", "--subnet", "1", "--node", "1", "--amount", "1"],
        &cold0,
    )
    .unwrap();
    let err = tx(&["claim"], &cold0).unwrap_err();
    assert!(format!("{err:#}").contains("nothing to claim"), "{err:#}");
    tx(&["delegate", "--subnet", "1", "--amount", "10"], &alice).unwrap();
    tx(&["undelegate", "--subnet", "1", "--shares", "4"], &alice).unwrap();

    for q in [
        vec!["query", "account", "--rpc", &url, "--key", &alice],
        vec!["query", "account", "--rpc", &url, "--address", &bob_addr],
        vec!["query", "subnet", "--rpc", &url],
        vec!["query", "subnet", "--rpc", &url, "--subnet", "1"],
        vec!["query", "node", "--rpc", &url, "--subnet", "1"],
        vec![
            "query", "node", "--rpc", &url, "--subnet", "1", "--node", "2",
        ],
        vec!["query", "epoch", "--rpc", &url, "--subnet", "1"],
        vec!["query", "block", "--rpc", &url],
        vec![
            "query",
            "proof-of-stake",
            "--rpc",
            &url,
            "--subnet",
            "1",
            "--peer-id",
            "peer1",
            "--min-class",
            "validator",
        ],
    ] {
        run(&q).unwrap_or_else(|e| panic!("{q:?}: {e:#}"));
    }
    assert!(run(&["query", "subnet", "--rpc", &url, "--subnet", "9"]).is_err());

    let (node_state, bob_bal, pos) = rt.block_on(async {
        let c = LedgerClient::connect(&url).await.unwrap();
        (
            c.node(1, 1).await.unwrap().unwrap(),
            c.account(&b.address()).await.unwrap().balance,
            c.proof_of_stake(1, "peer1", ledger::types::NodeClass::Validator)
                .await
                .unwrap(),
        )
    });
    assert_eq!(node_state.stake, 6 * TOKEN);
    assert_eq!(bob_bal, 4 * TOKEN);
    assert!(pos.staked);
    assert_eq!(
        a.address(),
        Keypair::load(std::path::Path::new(&alice))
            .unwrap()
            .address()
    );
    rt.block_on(node.stop());
}
