//! `cargo bench -p ledger`: transactions applied per second, and the cost
//! of the epoch step for a subnet of 10, 1,000 and 10,000 nodes. Prints a
//! table and writes `target/bench-ledger.json`.

use std::time::{Duration, Instant};

use ledger::chain::build_block;
use ledger::genesis::GenesisBalance;
use ledger::merkle::StateCommitment;
use ledger::runtime::BlockContext;
use ledger::sim::SimChain;
use ledger::state::Overlay;
use ledger::storage::Store;
use ledger::types::NodeScore;
use ledger::{Call, Genesis, Keypair, Runtime, SignedTx, TOKEN};
use serde_json::json;

fn seed_key(tag: u8, i: u32) -> Keypair {
    let mut s = [0u8; 32];
    s[0] = tag;
    s[1..5].copy_from_slice(&i.to_be_bytes());
    Keypair::from_seed(s)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct TxBench {
    txs: usize,
    apply_tps: f64,
    block_tps: f64,
    redb_tps: f64,
}

fn bench_txs() -> TxBench {
    let accounts = 1_000u32;
    let n = 10_000usize;
    let keys: Vec<Keypair> = (0..accounts).map(|i| seed_key(1, i)).collect();
    let mut g = Genesis::dev(&[]);
    g.balances = keys
        .iter()
        .map(|k| GenesisBalance {
            address: k.address(),
            amount: 1_000 * TOKEN,
        })
        .collect();
    g.params.max_block_txs = n as u32;
    let chain = SimChain::new(&g).unwrap();
    let txs: Vec<SignedTx> = (0..n)
        .map(|i| {
            let from = i % accounts as usize;
            let to = keys[(from + 1) % accounts as usize].address();
            chain.tx_at(
                &keys[from],
                (i / accounts as usize) as u64,
                Call::Transfer { to, amount: TOKEN },
            )
        })
        .collect();

    // Apply only (signature check + rules + overlay writes).
    let ctx = BlockContext {
        height: 1,
        parent_hash: chain.head.hash(),
    };
    let mut runs = vec![];
    for _ in 0..3 {
        let mut o = Overlay::new(&chain.state);
        let t = Instant::now();
        chain.runtime.begin_block(&mut o, &ctx).unwrap();
        for tx in &txs {
            chain.runtime.apply_tx(&mut o, &ctx, tx).unwrap();
        }
        runs.push(t.elapsed());
    }
    let apply = median(runs);

    // A whole block: build, state root, apply to the in-memory state.
    let mut runs = vec![];
    for _ in 0..3 {
        let mut c = chain.clone();
        let t = Instant::now();
        let (b, rejected) = c.produce(txs.clone()).unwrap();
        runs.push(t.elapsed());
        assert!(rejected.is_empty() && b.txs.len() == n);
    }
    let block = median(runs);

    // The dev chain's path: build on a redb snapshot, commit in one write transaction.
    let rt = Runtime::new(&g).unwrap();
    let mut runs = vec![];
    for _ in 0..3 {
        let store = Store::open_in_memory(&rt, &g).unwrap();
        let t = Instant::now();
        let snap = store.snapshot().unwrap();
        let parent = snap.head().header.clone();
        let built =
            build_block(&rt, &snap, &parent, txs.clone(), 0, |c| store.root_with(c)).unwrap();
        store.commit(&built.block, built.changes).unwrap();
        runs.push(t.elapsed());
    }
    let redb = median(runs);
    let tps = |d: Duration| n as f64 / d.as_secs_f64();
    TxBench {
        txs: n,
        apply_tps: tps(apply),
        block_tps: tps(block),
        redb_tps: tps(redb),
    }
}

struct EpochBench {
    nodes: u32,
    step_ms: f64,
    root_ms: f64,
    state_entries: usize,
}

fn bench_epoch(nodes: u32) -> EpochBench {
    let owner = seed_key(2, 0);
    let colds: Vec<Keypair> = (0..nodes).map(|i| seed_key(3, i)).collect();
    let hots: Vec<Keypair> = (0..nodes).map(|i| seed_key(4, i)).collect();
    let mut g = Genesis::dev(&[]);
    g.balances.push(GenesisBalance {
        address: owner.address(),
        amount: 1_000_000 * TOKEN,
    });
    for k in &colds {
        g.balances.push(GenesisBalance {
            address: k.address(),
            amount: 1_000 * TOKEN,
        });
    }
    g.params.epoch_length = 5;
    g.params.max_block_txs = 20_000;
    let mut chain = SimChain::new(&g).unwrap();
    chain
        .exec(
            &owner,
            Call::RegisterSubnet {
                name: "bench".into(),
                min_stake: TOKEN,
                max_stake: 1_000 * TOKEN,
            },
        )
        .unwrap();
    let regs: Vec<SignedTx> = (0..nodes as usize)
        .map(|i| {
            chain.tx(
                &colds[i],
                Call::RegisterNode {
                    subnet: 1,
                    hotkey: hots[i].address(),
                    peer_id: format!("peer{i}"),
                    stake: 10 * TOKEN,
                },
            )
        })
        .collect();
    let (b, rej) = chain.produce(regs).unwrap();
    assert!(rej.is_empty(), "{:?}", rej.first());
    assert_eq!(b.txs.len(), nodes as usize);
    chain
        .exec(&owner, Call::ActivateSubnet { subnet: 1 })
        .unwrap();
    let e = chain.runtime.params.epoch_length;
    chain.advance_to((chain.head.height / e + 1) * e).unwrap();
    let rec = ledger::runtime::epochs::record(&chain.state, 1)
        .unwrap()
        .unwrap();
    let v = (rec.validator - 1) as usize;
    let scores: Vec<NodeScore> = (1..=nodes)
        .map(|id| NodeScore {
            node: id,
            score: 100 + id as u64 % 7,
        })
        .collect();
    let mut txs = vec![chain.tx(&hots[v], Call::ProposeAttestation { subnet: 1, scores })];
    for (i, h) in hots.iter().enumerate() {
        if i != v {
            txs.push(chain.tx(h, Call::Attest { subnet: 1 }));
        }
    }
    let (_, rej) = chain.produce(txs).unwrap();
    assert!(rej.is_empty(), "{:?}", rej.first());
    chain
        .advance_to((chain.head.height / e + 1) * e - 1)
        .unwrap();

    // Time the boundary block's epoch step from the same parent state.
    let ctx = BlockContext {
        height: chain.head.height + 1,
        parent_hash: chain.head.hash(),
    };
    let reps = if nodes >= 10_000 { 7 } else { 21 };
    let mut steps = vec![];
    let mut changes = None;
    for _ in 0..reps {
        let mut o = Overlay::new(&chain.state);
        let t = Instant::now();
        chain.runtime.begin_block(&mut o, &ctx).unwrap();
        steps.push(t.elapsed());
        changes = Some(o.into_changes());
    }
    let changes = changes.unwrap();
    // Sanity: the epoch paid out (issuance grew) and every node was touched.
    let after = {
        let mut o = Overlay::new(&chain.state);
        o.merge(changes.clone());
        ledger::runtime::queries::audit_issuance(&o).unwrap()
    };
    assert!(after.holds() && after.issuance > chain.audit().issuance);
    let entries = chain.state.entries.len();
    let commitment =
        StateCommitment::from_entries(chain.state.entries.iter().map(|(k, v)| (&k[..], &v[..])));
    let mut roots = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(commitment.root_with(&changes));
        roots.push(t.elapsed());
    }
    EpochBench {
        nodes,
        step_ms: ms(median(steps)),
        root_ms: ms(median(roots)),
        state_entries: entries,
    }
}

fn main() {
    let tx = bench_txs();
    println!("ledger benchmark (release build)");
    println!();
    println!(
        "transactions ({} transfers, 1,000 senders, Ed25519 verification included)",
        tx.txs
    );
    println!(
        "  apply only (rules on an overlay)      {:>10.0} tx/s",
        tx.apply_tps
    );
    println!(
        "  block: build + state root (memory)    {:>10.0} tx/s",
        tx.block_tps
    );
    println!(
        "  block: build + root + redb commit     {:>10.0} tx/s",
        tx.redb_tps
    );
    println!();
    println!("epoch step (one active subnet, all nodes Validator, attested proposal scoring all)");
    println!(
        "  {:>7} {:>14} {:>16} {:>14}",
        "nodes", "step (ms)", "state root (ms)", "state entries"
    );
    let mut epochs = vec![];
    for n in [10u32, 1_000, 10_000] {
        let r = bench_epoch(n);
        println!(
            "  {:>7} {:>14.3} {:>16.3} {:>14}",
            r.nodes, r.step_ms, r.root_ms, r.state_entries
        );
        epochs.push(json!({
            "nodes": r.nodes, "epoch_step_ms": r.step_ms, "state_root_ms": r.root_ms, "state_entries": r.state_entries,
        }));
    }
    let out = json!({
        "txs": { "count": tx.txs, "apply_tps": tx.apply_tps, "block_tps": tx.block_tps, "redb_block_tps": tx.redb_tps },
        "epoch_step": epochs,
    });
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target"
    ))];
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(d.into());
    }
    for d in dirs {
        let _ = std::fs::create_dir_all(&d);
        let p = d.join("bench-ledger.json");
        match std::fs::write(&p, serde_json::to_string_pretty(&out).unwrap_or_default()) {
            Ok(()) => println!("wrote {}", p.display()),
            Err(e) => eprintln!("cannot write {}: {e}", p.display()),
        }
    }
}
