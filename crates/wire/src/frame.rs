//! Length-prefixed frames: a little-endian `u32` length, then a postcard body.
//!
//! The length is checked against the receiver's limit before the body is
//! read, so an oversized frame costs the receiver four bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::WireError;

/// Size limits a receiver enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame body accepted, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        // 64 MiB: a 2048-token prompt of an 8192-wide model in f32.
        Self {
            max_frame_bytes: 64 << 20,
        }
    }
}

impl FrameLimits {
    /// Checks a declared frame length.
    ///
    /// # Errors
    /// [`WireError::FrameTooLarge`].
    pub fn check(&self, size: usize) -> Result<(), WireError> {
        if size > self.max_frame_bytes {
            return Err(WireError::FrameTooLarge {
                size,
                limit: self.max_frame_bytes,
            });
        }
        Ok(())
    }
}

/// Serializes `msg` as a frame, length prefix included.
///
/// # Errors
/// When the message cannot be serialized or does not fit in a frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4])?;
    let body = out.len() - 4;
    let len = u32::try_from(body).map_err(|_| WireError::FrameTooLarge {
        size: body,
        limit: u32::MAX as usize,
    })?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Parses a frame body (without its length prefix).
///
/// # Errors
/// When the body is larger than `limits` allow or is not a valid `T`.
pub fn decode_frame<T: DeserializeOwned>(
    body: &[u8],
    limits: &FrameLimits,
) -> Result<T, WireError> {
    limits.check(body.len())?;
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use crate::message::{NextHop, Push, Request, Response, Step};
    use crate::tensor::{Compression, WireTensor};
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let step = Step {
            position: 7,
            hidden: WireTensor::encode(&[1.0, 2.0], &[1, 1, 2], Compression::None).unwrap(),
            next: vec![NextHop {
                peer: vec![0, 1, 2],
                session: u64::MAX,
            }],
        };
        for request in [
            Request::Step(step.clone()),
            Request::Push(Push { session: 9, step }),
        ] {
            let frame = encode_frame(&request).unwrap();
            let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4);
            let back: Request = decode_frame(&frame[4..], &FrameLimits::default()).unwrap();
            assert_eq!(back, request);
        }
        let err = Response::error(ErrorCode::TooLong, "x");
        let frame = encode_frame(&err).unwrap();
        assert_eq!(
            decode_frame::<Response>(&frame[4..], &FrameLimits::default()).unwrap(),
            err
        );
    }

    #[test]
    fn oversized_and_trailing_bodies_are_refused() {
        let frame = encode_frame(&Request::Info).unwrap();
        let mut body = frame[4..].to_vec();
        body.push(0);
        assert!(matches!(
            decode_frame::<Request>(&body, &FrameLimits::default()),
            Err(WireError::Malformed(_))
        ));
        let tiny = FrameLimits { max_frame_bytes: 0 };
        assert!(matches!(
            decode_frame::<Request>(&frame[4..], &tiny),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Request>(&body, &FrameLimits::default());
            let _ = decode_frame::<Response>(&body, &FrameLimits::default());
        }
    }
}
