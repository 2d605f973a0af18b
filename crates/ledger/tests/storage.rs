//! The engine-neutral path a BFT engine will use: build on an overlay of a
//! redb snapshot (propose), re-execute elsewhere (verify), commit each
//! finalized block in one write transaction.

mod common;

use common::*;
use ledger::chain::{build_block, verify_block};
use ledger::storage::Store;
use ledger::{Call, Hash32, LedgerError, Runtime, TOKEN};

#[test]
fn propose_verify_commit_on_in_memory_redb() {
    let g = genesis(4);
    let rt = Runtime::new(&g).unwrap();
    let proposer = Store::open_in_memory(&rt, &g).unwrap();
    let verifier = Store::open_in_memory(&rt, &g).unwrap();
    assert_eq!(proposer.head(), verifier.head());
    let sim = ledger::sim::SimChain::new(&g).unwrap();
    assert_eq!(sim.root(), proposer.head().header.state_root);

    let txs = vec![
        sim.tx(
            &key(1),
            Call::Transfer {
                to: key(2).address(),
                amount: TOKEN,
            },
        ),
        // Refused (bad nonce): left out of the block, not an error.
        sim.tx_at(
            &key(1),
            7,
            Call::Transfer {
                to: key(2).address(),
                amount: TOKEN,
            },
        ),
    ];
    let snap = proposer.snapshot().unwrap();
    let parent = snap.head().header.clone();
    let built = build_block(&rt, &snap, &parent, txs, 0, |c| proposer.root_with(c)).unwrap();
    assert_eq!(built.block.txs.len(), 1);
    assert_eq!(built.rejected.len(), 1);
    // Building wrote nothing.
    assert_eq!(proposer.head().header.height, 0);

    // Verify on the other node, then tamper and watch it fail.
    let vsnap = verifier.snapshot().unwrap();
    let changes = verify_block(&rt, &vsnap, &parent, &built.block, |c| {
        verifier.root_with(c)
    })
    .unwrap();
    assert_eq!(changes, built.changes);
    let mut bad = built.block.clone();
    bad.header.state_root = Hash32([9; 32]);
    assert!(matches!(
        verify_block(&rt, &vsnap, &parent, &bad, |c| verifier.root_with(c)),
        Err(LedgerError::InvalidBlock(_))
    ));
    let mut bad = built.block.clone();
    bad.txs.clear();
    assert!(verify_block(&rt, &vsnap, &parent, &bad, |c| verifier.root_with(c)).is_err());

    proposer.commit(&built.block, built.changes).unwrap();
    verifier.commit(&built.block, changes).unwrap();
    assert_eq!(proposer.head(), verifier.head());
    assert_eq!(proposer.block(1).unwrap().unwrap(), built.block);
    let h = built.block.txs[0].hash();
    assert_eq!(proposer.tx_location(&h).unwrap().unwrap().height, 1);
    // A block that does not extend the head is refused.
    assert!(proposer.commit(&built.block, Default::default()).is_err());
}

#[test]
fn reopen_resumes_and_checks_the_state_root() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.redb");
    let g = genesis(4);
    let rt = Runtime::new(&g).unwrap();
    let head = {
        let store = Store::open(&path, &rt, &g).unwrap();
        let sim = ledger::sim::SimChain::new(&g).unwrap();
        for i in 0..3u64 {
            let snap = store.snapshot().unwrap();
            let parent = snap.head().header.clone();
            let tx = sim.tx_at(
                &key(1),
                i,
                Call::Transfer {
                    to: key(3).address(),
                    amount: 1,
                },
            );
            let b = build_block(&rt, &snap, &parent, vec![tx], 0, |c| store.root_with(c)).unwrap();
            store.commit(&b.block, b.changes).unwrap();
        }
        store.head()
    };
    let store = Store::open(&path, &rt, &g).unwrap();
    assert_eq!(store.head(), head);
    assert_eq!(head.header.height, 3);
    // redb allows one open handle per file.
    drop(store);
    let mut other = g.clone();
    other.balances.pop();
    assert!(matches!(
        Store::open(&path, &Runtime::new(&other).unwrap(), &other),
        Err(LedgerError::ChainMismatch(_))
    ));
}
