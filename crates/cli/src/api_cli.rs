//! `hypertensor api`: the OpenAI-compatible HTTP server, the web chat and the
//! swarm monitor.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use api::{Backend, LocalBackend, SwarmBackend};
use clap::Args;

use crate::local::{Blocks, ModelArgs};
use crate::swarm_cli::{SwarmArgs, model_id};

/// Serve a model over an OpenAI-compatible HTTP API, with a web chat at `/`
/// and a swarm monitor at `/monitor`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The model: loaded whole into this process, or with `--initial-peers`
    /// only its embeddings, head and tokenizer.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; port 0 picks a free one. Listening beyond
    /// 127.0.0.1 exposes the API (which has no authentication) to the network.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// With `--initial-peers`, the blocks run in the swarm.
    #[command(flatten)]
    pub swarm: SwarmArgs,
    /// Show this subnet's nodes, as the chain records them, on the monitor
    /// (with `--initial-peers` and `--chain-rpc`).
    #[arg(long, requires_all = ["chain_rpc", "initial_peers"])]
    pub subnet: Option<ledger::types::SubnetId>,
    /// The chain's RPC address, http://HOST:PORT.
    #[arg(long, requires = "subnet")]
    pub chain_rpc: Option<String>,
}

impl ApiArgs {
    pub fn run(self) -> Result<()> {
        // The model is opened before the runtime starts: ModelArgs sets the
        // compute thread count, which must happen while this is the only thread.
        // `_identity`: the client's named identity, held while the api runs.
        let (backend, runtime, _identity): (Arc<dyn Backend>, _, _) = if self.swarm.remote() {
            let checkpoint = self.model.open()?;
            let runtime = tokio::runtime::Runtime::new()?;
            let max_length = checkpoint.config().max_position_embeddings as u32;
            let (remote, identity) = runtime.block_on(self.swarm.connect(
                &checkpoint,
                self.model.precision(),
                max_length,
            ))?;
            let mut backend = SwarmBackend::new(remote, runtime.handle().clone());
            if let (Some(subnet), Some(rpc)) = (self.subnet, &self.chain_rpc) {
                let ledger = runtime
                    .block_on(ledger::rpc_client::LedgerClient::connect(rpc))
                    .with_context(|| format!("cannot reach the chain at {rpc}"))?;
                backend = backend.with_chain(ledger, subnet);
            }
            (Arc::new(backend), runtime, identity)
        } else {
            (self.local_backend()?, tokio::runtime::Runtime::new()?, None)
        };
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("cannot listen on {}", self.listen))?;
            let addr = listener.local_addr()?;
            // Tests and scripts wait for this line: print it only once bound.
            println!("api listening on http://{addr}");
            println!("monitor at http://{addr}/monitor");
            api::serve(listener, backend, async {
                // If the handler cannot be installed, wait forever rather than
                // stop at once; the process can still be killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
                eprintln!("shutting down");
            })
            .await?;
            Ok(())
        })
    }

    /// The whole model loaded in this process.
    fn local_backend(&self) -> Result<Arc<dyn Backend>> {
        let path = model::resolve_model(&self.model.model)?;
        let id = model_id(&path, self.swarm.model_id.as_deref())?;
        let loaded = self.model.load(&self.swarm)?;
        let Blocks::Local(model) = loaded.blocks else {
            unreachable!("without --initial-peers the blocks load locally")
        };
        Ok(Arc::new(LocalBackend::new(
            id,
            model,
            loaded.tokenizer,
            loaded.template,
            loaded.max_length,
        )))
    }
}
