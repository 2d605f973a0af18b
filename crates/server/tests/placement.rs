//! Servers started with only a block count spread over the model until every
//! block is covered.

mod common;

use common::*;
use server::SpanChoice;
use wire::ServerState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_with_num_blocks_cover_the_whole_model() {
    const BLOCKS: u32 = 6;
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), BLOCKS as usize);
    let boot = node(None).await;
    // Four servers of 2 blocks start at once: they cannot all see each other
    // when they choose, so some start on the same blocks and must move.
    let servers = futures::future::join_all(
        (0..4).map(|_| server(&boot, config(&path, SpanChoice::Auto(2)))),
    )
    .await;
    let client = node(Some(&boot)).await;
    let spans = eventually(60, || async {
        let found = client.find_servers(MODEL, BLOCKS).await.unwrap();
        let peers: Vec<_> = found
            .iter()
            .filter(|(_, i)| i.state == ServerState::Online)
            .map(|(_, i)| server::placement::Peer {
                span: i.span,
                throughput: 1.0,
            })
            .collect();
        (peers.len() == 4 && server::placement::covers_all(BLOCKS, &peers)).then_some(peers)
    })
    .await;
    assert!(spans.iter().all(|p| p.span.len() == 2));
    for s in servers {
        s.shutdown().await;
    }
}
