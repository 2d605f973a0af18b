//! A bare dev node for tests and local use: `ledger-devnode --data-dir DIR
//! --genesis FILE [--rpc-addr 127.0.0.1:0] [--block-time-ms 1000]`.
//! Prints `rpc listening on http://ADDR` once serving. The `hypertensor
//! chain run --dev` command does the same with the full CLI around it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use ledger::Genesis;
use ledger::devnode::{DevNode, DevNodeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut data_dir = None;
    let mut genesis = None;
    let mut rpc_addr = "127.0.0.1:0".to_string();
    let mut block_time_ms: u64 = 1000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--data-dir" => data_dir = Some(PathBuf::from(val()?)),
            "--genesis" => genesis = Some(PathBuf::from(val()?)),
            "--rpc-addr" => rpc_addr = val()?,
            "--block-time-ms" => block_time_ms = val()?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let genesis = Genesis::load(&genesis.ok_or("--genesis is required")?)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let node = DevNode::start(DevNodeConfig {
            data_dir,
            genesis,
            rpc_addr: rpc_addr.parse()?,
            block_time: (block_time_ms > 0).then(|| Duration::from_millis(block_time_ms)),
        })
        .await?;
        println!("rpc listening on {}", node.rpc_url());
        std::io::stdout().flush()?;
        tokio::signal::ctrl_c().await?;
        node.stop().await;
        Ok(())
    })
}
