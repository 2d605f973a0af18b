//! Errors that stop a server from starting or serving.

/// Why the server cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The p2p layer failed.
    #[error(transparent)]
    P2p(#[from] p2p::P2pError),
    /// The requested blocks do not exist in the model.
    #[error("blocks {start}:{end} are not within the model's {num_blocks} blocks")]
    BadSpan {
        /// First block.
        start: u32,
        /// One past the last.
        end: u32,
        /// Blocks in the model.
        num_blocks: u32,
    },
    /// A background task died.
    #[error("server task failed: {0}")]
    Task(String),
}
