//! The bytes peers exchange: versioned protocol messages, the DHT's
//! [`ServerInfo`] schema, and the tensor codec (dtype, shape, bytes; f16/bf16
//! compression) with size limits.
//!
//! Shared by `p2p` (which signs records and moves frames), `server` and
//! `client`. It depends on nothing else in the workspace and knows nothing of
//! tensors beyond flat `f32` buffers, so it stays cheap to build and fuzz.

pub mod error;
pub mod frame;
pub mod info;
pub mod message;
pub mod tensor;

pub use error::{ErrorCode, WireError};
pub use frame::{FrameLimits, decode_frame, encode_frame};
pub use info::{ServerInfo, ServerState, Span, Throughput};
pub use message::{
    BackwardRequest, ErrorFrame, ForwardRequest, NextHop, OpenSession, Push, Request, Response,
    Step, StepOutput,
};
pub use tensor::{Compression, TensorDType, WireTensor};

/// The inference stream protocol's name, version included.
pub const INFERENCE_PROTOCOL: &str = "/hypertensor/inference/1";

/// Version of the message schemas in this crate, carried in [`ServerInfo`].
pub const WIRE_VERSION: u16 = 2;
