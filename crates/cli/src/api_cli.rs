//! `hypertensor api`: the OpenAI-compatible HTTP server, the web chat and the
//! swarm monitor.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use api::{Backend, LocalBackend};
use clap::Args;

use crate::local::ModelArgs;

/// Serve a model over an OpenAI-compatible HTTP API, with a web chat at `/`
/// and a swarm monitor at `/monitor`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The model to load whole into this process (as `chat` does).
    #[command(flatten)]
    pub model: ModelArgs,
    /// The id clients pass as `model` (default: the checkpoint's file name
    /// without extension, as `serve` announces it).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Address to listen on; port 0 picks a free one. Listening beyond
    /// 127.0.0.1 exposes the API (which has no authentication) to the network.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    // Swarm mode goes here: `--initial-peers` (and the other PeerArgs) will
    // make the backend the swarm client instead of a local model; see
    // `backend()`.
}

impl ApiArgs {
    pub fn run(self) -> Result<()> {
        // Loaded before the runtime starts: ModelArgs sets the compute thread
        // count, which must happen while this is the only thread.
        let backend = self.backend()?;
        let runtime = tokio::runtime::Runtime::new()?;
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

    /// The backend the API talks to.
    ///
    /// Swarm mode will branch here: with `--initial-peers`, build the swarm
    /// client's backend instead of loading the model locally.
    fn backend(&self) -> Result<Arc<dyn Backend>> {
        let id = match &self.model_id {
            Some(id) => id.clone(),
            None => model::resolve_model(&self.model.model)?
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .context("cannot derive a model id from the path; pass --model-id")?,
        };
        let loaded = self.model.load()?;
        Ok(Arc::new(LocalBackend::new(
            id,
            loaded.model,
            loaded.tokenizer,
            loaded.template,
            loaded.max_length,
        )))
    }
}
