//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Variants carry enough context (paths, names, limits) that the message alone
/// tells a user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint path does not exist or cannot be read.
    #[error("cannot open model at {path}: {source}")]
    Open {
        /// The path that was tried.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The path exists but is neither a GGUF file nor a Hugging Face checkpoint folder.
    #[error(
        "{0} is not a model: expected a .gguf file or a folder with config.json and *.safetensors"
    )]
    UnknownLayout(PathBuf),
    /// The checkpoint file is damaged: truncated, bad magic, inconsistent header.
    #[error("corrupt checkpoint {path}: {reason}")]
    Corrupt {
        /// The file that failed to parse.
        path: PathBuf,
        /// What the parser found wrong.
        reason: String,
    },
    /// The checkpoint describes a model this executor does not implement.
    #[error("unsupported architecture {0:?}: only Llama-family models are supported")]
    UnsupportedArchitecture(String),
    /// A required hyper-parameter is missing or has an impossible value.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A tensor that the architecture needs is absent from the checkpoint.
    #[error("tensor {0:?} is missing from the checkpoint")]
    MissingTensor(String),
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name in the checkpoint.
        name: String,
        /// Shape found.
        actual: Vec<usize>,
        /// Shape required by the config.
        expected: Vec<usize>,
    },
    /// A block range that is empty or reaches past the model's last block.
    #[error("invalid block span {start}..{end}: the model has {num_blocks} blocks")]
    InvalidSpan {
        /// First block requested.
        start: usize,
        /// One past the last block requested.
        end: usize,
        /// Blocks in the model.
        num_blocks: usize,
    },
    /// An operation this model's representation cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An input tensor whose shape does not fit the operation.
    #[error("bad input shape: {0}")]
    InputShape(String),
    /// A token id at or past the vocabulary size.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// A sequence that would grow past the context the cache or model allows.
    #[error("context too long: {requested} tokens requested, the limit is {limit}")]
    ContextTooLong {
        /// Positions the sequence would occupy.
        requested: usize,
        /// The maximum allowed.
        limit: usize,
    },
    /// A [`BlockRunner`](crate::BlockRunner) outside this crate (remote
    /// servers) failed; its own error says why.
    #[error("running the blocks failed: {0}")]
    Blocks(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Sampling parameters out of their valid range.
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    /// Fetching or verifying the default model package failed.
    #[error("model package: {0}")]
    Package(String),
    /// An error inside candle (device, dtype or kernel failure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Any other I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
