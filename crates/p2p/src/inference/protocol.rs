//! The bytes of `/hypertensor/inference/1` on a stream: length-prefixed
//! postcard frames (see [`wire::frame`]).
//!
//! A frame whose length fits the limit but whose body does not parse leaves
//! the stream in sync, so a server can answer with an error frame and keep the
//! session; an oversized length cannot be skipped cheaply, so the stream ends.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wire::{FrameLimits, WireError};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or was reset.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is oversized or its body is not a valid message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer closed the stream.
    #[error("the peer closed the stream")]
    Closed,
}

impl FrameError {
    /// Whether the stream is still in sync after this error (the next frame can
    /// be read).
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            Self::Wire(WireError::Malformed(_) | WireError::BadTensor(_))
        )
    }
}

/// Writes `msg` as one frame and flushes.
///
/// # Errors
/// When encoding or the stream fails.
pub async fn write_frame<S, T>(stream: &mut S, msg: &T) -> Result<(), FrameError>
where
    S: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = wire::encode_frame(msg)?;
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Writes `body` as one frame without checking that it parses: what a broken
/// or hostile peer would send. Tests use it to probe the server's defences.
///
/// # Errors
/// When the stream fails.
pub async fn write_raw_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    body: &[u8],
) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| WireError::FrameTooLarge {
        size: body.len(),
        limit: u32::MAX as usize,
    })?;
    stream.write_all(&len.to_le_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer closed the stream cleanly
/// between frames.
///
/// # Errors
/// [`FrameError`]; the body is not read when its length exceeds `limits`.
pub async fn read_frame<S, T>(stream: &mut S, limits: &FrameLimits) -> Result<Option<T>, FrameError>
where
    S: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = stream.read(&mut len[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        filled += n;
    }
    let size = u32::from_le_bytes(len) as usize;
    limits.check(size)?;
    let mut body = vec![0u8; size];
    stream.read_exact(&mut body).await?;
    Ok(Some(wire::decode_frame(&body, limits)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use wire::Request;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_clean() {
        let mut buf = Cursor::new(Vec::new());
        write_frame(&mut buf, &Request::Info).await.unwrap();
        write_frame(&mut buf, &Request::Close).await.unwrap();
        buf.set_position(0);
        let l = FrameLimits::default();
        assert_eq!(
            read_frame::<_, Request>(&mut buf, &l).await.unwrap(),
            Some(Request::Info)
        );
        assert_eq!(
            read_frame::<_, Request>(&mut buf, &l).await.unwrap(),
            Some(Request::Close)
        );
        assert_eq!(read_frame::<_, Request>(&mut buf, &l).await.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_frames_are_classified() {
        let mut buf = Cursor::new(Vec::new());
        write_raw_frame(&mut buf, &[0xff, 0xff, 0xff])
            .await
            .unwrap();
        write_raw_frame(&mut buf, &[0u8; 100]).await.unwrap();
        buf.set_position(0);
        let err = read_frame::<_, Request>(&mut buf, &FrameLimits::default())
            .await
            .unwrap_err();
        assert!(err.is_recoverable(), "{err}");
        let small = FrameLimits {
            max_frame_bytes: 10,
        };
        let err = read_frame::<_, Request>(&mut buf, &small)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            FrameError::Wire(WireError::FrameTooLarge { size: 100, .. })
        ));
        assert!(!err.is_recoverable());
        let mut cut = Cursor::new(vec![5u8, 0]);
        assert!(matches!(
            read_frame::<_, Request>(&mut cut, &FrameLimits::default()).await,
            Err(FrameError::Io(_))
        ));
    }
}
