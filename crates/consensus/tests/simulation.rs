//! Validators on commonware's deterministic runtime and simulated network,
//! with redb's in-memory backend, so a seed replays the same run.
//!
//! Every check is on outcomes: at each height all validators hold the same
//! block and state root, every submitted transaction is committed exactly
//! once, and the chain progresses whenever 3 of 4 validators are connected.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use commonware_cryptography::Signer as _;
use commonware_p2p::simulated::{self, Link, Network, Oracle};
use commonware_runtime::{Clock, Handle, Quota, Runner as _, Supervisor as _, deterministic};
use commonware_utils::{NZU32, NZUsize, probability};
use consensus::chain::Chain;
use consensus::engine::{self, Channels, Timeouts, channel};
use consensus::producer::BftProducer;
use consensus::{PublicKey, private_key};
use futures::channel::mpsc;
use ledger::chain::BlockProducer;
use ledger::genesis::GenesisValidator;
use ledger::storage::Store;
use ledger::{Address, Call, Genesis, Hash32, Keypair, Runtime, TOKEN, Tx};

const QUOTA: Quota = Quota::per_second(NZU32!(100_000));
const MAX_BLOCK: usize = 1024 * 1024;

fn lossy() -> Link {
    Link {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        success_rate: probability!(0.9),
    }
}

struct Net {
    oracle: Oracle<PublicKey, deterministic::Context>,
    genesis: Genesis,
    keys: Vec<Keypair>,
    users: Vec<Keypair>,
    stores: Vec<Arc<Store>>,
    nodes: Vec<Option<Node>>,
}

struct Node {
    producer: BftProducer,
    handle: Handle<()>,
}

fn genesis(keys: &[Keypair], bonds: &[u128], users: &[Keypair], epoch_blocks: u64) -> Genesis {
    let mut g = Genesis::dev(
        &users
            .iter()
            .map(|u| (u.address(), 1_000 * TOKEN))
            .chain(keys.iter().map(|k| (k.address(), 1_000 * TOKEN)))
            .collect::<Vec<_>>(),
    );
    g.chain_id = "sim".into();
    g.params.chain_epoch_blocks = epoch_blocks;
    g.params.committee_size = 4;
    g.params.epoch_length = 7;
    g.validators = keys
        .iter()
        .zip(bonds)
        .filter(|(_, b)| **b > 0)
        .map(|(k, b)| GenesisValidator {
            address: k.address(),
            consensus_key: k.address(),
            bond: *b,
        })
        .collect();
    g
}

fn public(k: &Keypair) -> PublicKey {
    private_key(k).unwrap().public_key()
}

impl Net {
    async fn new(
        ctx: &deterministic::Context,
        validators: usize,
        bonds: &[u128],
        epoch_blocks: u64,
    ) -> Net {
        let keys: Vec<Keypair> = (0..validators)
            .map(|i| Keypair::from_seed([i as u8 + 1; 32]))
            .collect();
        let users: Vec<Keypair> = (0..4).map(|i| Keypair::from_seed([100 + i; 32])).collect();
        let genesis = genesis(&keys, bonds, &users, epoch_blocks);
        let peers: Vec<PublicKey> = keys.iter().map(public).collect();
        let (network, oracle) = Network::new_with_peers(
            ctx.child("network"),
            simulated::Config {
                max_size: 2 * MAX_BLOCK as u32,
                max_peers_per_set: NZUsize!(validators),
                disconnect_on_block: true,
                tracked_peer_sets: NZUsize!(1),
            },
            peers.clone(),
        )
        .await;
        network.start();
        let runtime = Runtime::new(&genesis).unwrap();
        let stores = (0..validators)
            .map(|_| Arc::new(Store::open_in_memory(&runtime, &genesis).unwrap()))
            .collect();
        let mut net = Net {
            oracle,
            genesis,
            keys,
            users,
            stores,
            nodes: Vec::new(),
        };
        for a in 0..validators {
            for b in 0..validators {
                if a != b {
                    net.link(a, b, lossy()).await;
                }
            }
        }
        for i in 0..validators {
            let node = net.start(ctx, i).await;
            net.nodes.push(Some(node));
        }
        net
    }

    async fn link(&self, a: usize, b: usize, link: Link) {
        let (pa, pb) = (public(&self.keys[a]), public(&self.keys[b]));
        let _ = self.oracle.add_link(pa, pb, link).await;
    }

    async fn unlink(&self, a: usize, b: usize) {
        let (pa, pb) = (public(&self.keys[a]), public(&self.keys[b]));
        let _ = self.oracle.remove_link(pa, pb).await;
    }

    async fn start(&self, ctx: &deterministic::Context, i: usize) -> Node {
        let key = private_key(&self.keys[i]).unwrap();
        let control = self.oracle.control(key.public_key());
        let mut reg = Vec::new();
        for ch in [
            channel::VOTES,
            channel::CERTIFICATES,
            channel::RESOLVER,
            channel::BACKFILL,
            channel::BROADCAST,
            channel::MEMPOOL,
        ] {
            reg.push(control.register(ch, QUOTA).await.unwrap());
        }
        let mut reg = reg.into_iter();
        let mut next = || reg.next().unwrap();
        let channels = Channels {
            votes: next(),
            certificates: next(),
            resolver: next(),
            backfill: next(),
            broadcast: next(),
            mempool: next(),
        };
        let runtime = Runtime::new(&self.genesis).unwrap();
        let chain = Arc::new(Chain::new(Arc::clone(&self.stores[i]), runtime, 10_000).unwrap());
        let (gossip_tx, gossip_rx) = mpsc::unbounded();
        let producer = BftProducer::new(Arc::clone(&chain), gossip_tx);
        let handle = engine::start(
            ctx.child("validator").with_attribute("index", i),
            engine::Config {
                signer: key,
                chain,
                blocker: control,
                peers: self.oracle.manager(),
                partition_prefix: format!("v{i}"),
                namespace: b"hypertensor/sim".to_vec(),
                timeouts: Timeouts::default(),
                max_block_bytes: MAX_BLOCK,
                gossip: gossip_rx,
            },
            channels,
        );
        Node { producer, handle }
    }

    /// Aborts every task of validator `i`, as a crash would; its storage
    /// (redb and the consensus partitions) survives, as on disk.
    async fn crash(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.handle.abort();
            let _ = n.handle.await;
        }
    }

    fn height(&self, i: usize) -> u64 {
        self.stores[i].head().header.height
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    /// Waits (in simulated time) until every listed validator reaches `h`.
    async fn wait_height(
        &self,
        ctx: &deterministic::Context,
        who: &[usize],
        h: u64,
        within: Duration,
    ) {
        let deadline = ctx.current() + within;
        while who.iter().any(|i| self.height(*i) < h) {
            assert!(
                ctx.current() < deadline,
                "heights {:?} did not reach {h}",
                who.iter().map(|i| self.height(*i)).collect::<Vec<_>>()
            );
            ctx.sleep(Duration::from_millis(50)).await;
        }
    }

    /// Submits a transfer from user `u` through validator `via`.
    fn transfer(&self, via: usize, u: usize, nonce: u64) -> Hash32 {
        let user = &self.users[u];
        let tx = Tx {
            signer: user.address(),
            nonce,
            call: Call::Transfer {
                to: Address([7; 32]),
                amount: TOKEN,
            },
        }
        .sign(user, &self.genesis.chain_id);
        let node = self.nodes[via].as_ref().unwrap();
        node.producer.submit(tx).unwrap()
    }

    /// Every validator agrees block by block up to the lowest head, and
    /// every block's state root matches.
    fn assert_agree(&self, who: &[usize]) -> u64 {
        let top = who.iter().map(|i| self.height(*i)).min().unwrap();
        for h in 0..=top {
            let blocks: Vec<_> = who
                .iter()
                .map(|i| self.stores[*i].block(h).unwrap().unwrap())
                .collect();
            for b in &blocks[1..] {
                assert_eq!(
                    b.hash(),
                    blocks[0].hash(),
                    "validators differ at height {h}"
                );
                assert_eq!(b.header.state_root, blocks[0].header.state_root);
            }
        }
        top
    }

    /// Each hash is committed exactly once (on validator `i`'s chain).
    fn assert_once(&self, i: usize, hashes: &[Hash32]) {
        let mut seen: BTreeMap<Hash32, u32> = BTreeMap::new();
        for h in 1..=self.height(i) {
            for tx in self.stores[i].block(h).unwrap().unwrap().txs {
                *seen.entry(tx.hash()).or_default() += 1;
            }
        }
        for h in hashes {
            assert_eq!(
                seen.get(h),
                Some(&1),
                "transaction {h} not committed exactly once"
            );
            assert!(self.stores[i].tx_location(h).unwrap().is_some());
        }
    }
}

fn runner(seed: u64) -> deterministic::Runner {
    deterministic::Runner::new(
        deterministic::Config::new()
            .with_seed(seed)
            .with_timeout(Some(Duration::from_secs(600))),
    )
}

/// Four validators over lossy links; a 2-2 partition stalls the chain
/// (no quorum), healing it resumes, and isolating one validator does not
/// stop the other three. Transactions submitted to different validators
/// are gossiped and included once. Returns the block hashes, to compare
/// runs.
fn lossy_partition_run(seed: u64) -> Vec<Hash32> {
    runner(seed).start(|ctx| async move {
        let net = Net::new(&ctx, 4, &[10 * TOKEN; 4], 25).await;
        let all = [0, 1, 2, 3];
        net.wait_height(&ctx, &all, 5, Duration::from_secs(60))
            .await;

        // Transactions through every validator's RPC-facing producer.
        let mut hashes = Vec::new();
        for nonce in 0..3 {
            for u in 0..4 {
                hashes.push(net.transfer(u, u, nonce));
            }
        }

        // 2-2 split: no side has a quorum of 3.
        for a in [0, 1] {
            for b in [2, 3] {
                net.unlink(a, b).await;
                net.unlink(b, a).await;
            }
        }
        ctx.sleep(Duration::from_secs(5)).await;
        let stalled = (0..4).map(|i| net.height(i)).max().unwrap();
        ctx.sleep(Duration::from_secs(10)).await;
        let after = (0..4).map(|i| net.height(i)).max().unwrap();
        assert!(
            after <= stalled + 1,
            "progress without a quorum: {stalled} -> {after}"
        );

        // Heal.
        for a in [0, 1] {
            for b in [2, 3] {
                net.link(a, b, lossy()).await;
                net.link(b, a, lossy()).await;
            }
        }
        net.wait_height(&ctx, &all, after + 10, Duration::from_secs(120))
            .await;

        // Isolate validator 3: the other three keep finalizing.
        for o in [0, 1, 2] {
            net.unlink(3, o).await;
            net.unlink(o, 3).await;
        }
        let h = net.height(0);
        net.wait_height(&ctx, &[0, 1, 2], h + 10, Duration::from_secs(120))
            .await;
        for o in [0, 1, 2] {
            net.link(3, o, lossy()).await;
            net.link(o, 3, lossy()).await;
        }
        let h = net.height(0);
        net.wait_height(&ctx, &all, h, Duration::from_secs(120))
            .await;

        let top = net.assert_agree(&all);
        for i in all {
            net.assert_once(i, &hashes);
            let audit =
                ledger::runtime::queries::audit_issuance(&net.stores[i].snapshot().unwrap())
                    .unwrap();
            assert!(audit.holds());
        }
        (0..=top)
            .map(|h| net.stores[0].block(h).unwrap().unwrap().hash())
            .collect()
    })
}

#[test]
fn four_validators_survive_loss_and_a_healed_partition() {
    let hashes = lossy_partition_run(7);
    // Genesis, 5 blocks, then 10 after healing and 10 more without validator 3.
    assert!(hashes.len() >= 26, "{} blocks", hashes.len());
}

#[test]
fn same_seed_same_run() {
    let short = |seed| {
        runner(seed).start(|ctx| async move {
            let net = Net::new(&ctx, 4, &[10 * TOKEN; 4], 25).await;
            net.transfer(0, 0, 0);
            net.wait_height(&ctx, &[0, 1, 2, 3], 15, Duration::from_secs(60))
                .await;
            net.assert_agree(&[0, 1, 2, 3]);
            (1..=15)
                .map(|h| net.stores[0].block(h).unwrap().unwrap().hash())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(short(3), short(3));
}

/// A validator crashes (its tasks are aborted; its redb and consensus
/// storage survive, as on disk), the rest carry on across several epoch
/// boundaries, and the restarted validator catches up through backfill to
/// the same blocks and state roots.
#[test]
fn crashed_validator_restarts_and_catches_up() {
    runner(11).start(|ctx| async move {
        let mut net = Net::new(&ctx, 4, &[10 * TOKEN; 4], 10).await;
        let all = [0, 1, 2, 3];
        net.wait_height(&ctx, &all, 8, Duration::from_secs(60))
            .await;
        net.crash(3).await;
        let mut hashes = Vec::new();
        for nonce in 0..2 {
            hashes.push(net.transfer(0, 0, nonce));
            hashes.push(net.transfer(1, 1, nonce));
        }
        let h = net.height(0);
        net.wait_height(&ctx, &[0, 1, 2], h + 25, Duration::from_secs(120))
            .await;
        assert!(net.height(3) < h + 1);

        let node = net.start(&ctx, 3).await;
        net.nodes[3] = Some(node);
        let target = net.height(0) + 5;
        net.wait_height(&ctx, &all, target, Duration::from_secs(180))
            .await;
        net.assert_agree(&all);
        for i in net.live() {
            net.assert_once(i, &hashes);
        }
    });
}

/// A fifth account bonds more than a genesis validator; at the next chain
/// epoch it replaces the smallest bond on the committee, and the chain
/// keeps finalizing with it voting (one old member is then crashed, so the
/// new member is needed for a quorum).
#[test]
fn committee_changes_at_the_epoch_boundary() {
    runner(5).start(|ctx| async move {
        let mut net = Net::new(
            &ctx,
            5,
            &[10 * TOKEN, 10 * TOKEN, 10 * TOKEN, 5 * TOKEN, 0],
            10,
        )
        .await;
        let voters = [0, 1, 2, 3, 4];
        net.wait_height(&ctx, &voters, 3, Duration::from_secs(60))
            .await;
        let newcomer = net.keys[4].clone();
        let bond = Tx {
            signer: newcomer.address(),
            nonce: 0,
            call: Call::BondValidator {
                consensus_key: newcomer.address(),
                amount: 20 * TOKEN,
            },
        }
        .sign(&newcomer, &net.genesis.chain_id);
        let hash = net.nodes[4]
            .as_ref()
            .unwrap()
            .producer
            .submit(bond)
            .unwrap();
        // Two epochs on, the committee is derived from a state with the bond.
        net.wait_height(&ctx, &voters, 25, Duration::from_secs(120))
            .await;
        net.assert_once(0, &[hash]);
        let snap = net.stores[0].snapshot().unwrap();
        let committee = ledger::runtime::validators::committee(&snap, 2)
            .unwrap()
            .unwrap();
        let members: Vec<Address> = committee.iter().map(|v| v.consensus_key).collect();
        assert!(members.contains(&newcomer.address()));
        assert!(!members.contains(&net.keys[3].address()));
        // Validator 3 left the committee; crash 0 too: 1, 2 and the newcomer
        // are a quorum of the new committee only if the newcomer votes.
        net.crash(0).await;
        let h = net.height(1);
        net.wait_height(&ctx, &[1, 2, 4], h + 8, Duration::from_secs(120))
            .await;
        net.assert_agree(&[1, 2, 3, 4]);
    });
}
