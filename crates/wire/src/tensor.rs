//! The tensor codec: a dtype, a shape and little-endian bytes.
//!
//! Activations are computed in f32; on the wire they may travel as f16 or
//! bf16 to halve the bytes per token. Decoding checks that the header and the
//! data agree before anything is allocated from the shape, so a hostile header
//! cannot make the receiver allocate more than the frame it already holds.

use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// Most dimensions a wire tensor may have.
pub const MAX_RANK: usize = 4;

/// Element type of a [`WireTensor`]'s bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorDType {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, 2 bytes.
    F16,
    /// bfloat16, 2 bytes.
    BF16,
}

impl TensorDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// How a sender encodes activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Compression {
    /// Exact f32.
    #[default]
    None,
    /// f16: half the bytes, about 3 significant digits.
    F16,
    /// bf16: half the bytes, f32's range with 2-3 significant digits.
    BF16,
}

impl Compression {
    fn dtype(self) -> TensorDType {
        match self {
            Self::None => TensorDType::F32,
            Self::F16 => TensorDType::F16,
            Self::BF16 => TensorDType::BF16,
        }
    }
}

/// A tensor as sent between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type of `data`.
    pub dtype: TensorDType,
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// Elements, little-endian, row-major.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Encodes `values` of shape `shape` with `compression`.
    ///
    /// # Errors
    /// When `shape` does not describe `values.len()` elements or has too many
    /// dimensions.
    pub fn encode(
        values: &[f32],
        shape: &[usize],
        compression: Compression,
    ) -> Result<Self, WireError> {
        let shape32 = checked_shape(shape)?;
        let count: usize = shape.iter().product();
        if count != values.len() {
            return Err(WireError::BadTensor(format!(
                "shape {shape:?} holds {count} elements, got {}",
                values.len()
            )));
        }
        let dtype = compression.dtype();
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            TensorDType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            TensorDType::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            TensorDType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        Ok(Self {
            dtype,
            shape: shape32,
            data,
        })
    }

    /// The shape as `usize`s.
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }

    /// Number of elements the header declares.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Checks that the header is sane and matches the data.
    ///
    /// # Errors
    /// [`WireError::BadTensor`] naming the disagreement.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.shape.is_empty() || self.shape.len() > MAX_RANK {
            return Err(WireError::BadTensor(format!(
                "rank {} is outside 1..={MAX_RANK}",
                self.shape.len()
            )));
        }
        let count = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| WireError::BadTensor(format!("shape {:?} overflows", self.shape)))?;
        let expected = count.checked_mul(self.dtype.size());
        if expected != Some(self.data.len()) {
            return Err(WireError::BadTensor(format!(
                "shape {:?} of {:?} needs {} bytes, got {}",
                self.shape,
                self.dtype,
                count.saturating_mul(self.dtype.size()),
                self.data.len()
            )));
        }
        Ok(())
    }

    /// Decodes to f32 values after [`validate`](Self::validate).
    ///
    /// # Errors
    /// When the header and data disagree.
    pub fn to_f32(&self) -> Result<Vec<f32>, WireError> {
        self.validate()?;
        Ok(match self.dtype {
            TensorDType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            TensorDType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            TensorDType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }

    /// The `[batch, tokens, width]` dims of an activation tensor whose
    /// header and data agree, without decoding it.
    ///
    /// # Errors
    /// When the tensor is not rank 3, has no tokens, has another width, or
    /// its data does not match its header.
    pub fn hidden_dims(&self, width: usize) -> Result<[usize; 3], WireError> {
        let dims = self.dims();
        match dims[..] {
            [b, t, w] if w == width && b > 0 && t > 0 => {
                self.validate()?;
                Ok([b, t, w])
            }
            _ => Err(WireError::BadTensor(format!(
                "hidden states must be [batch, tokens, {width}], got {dims:?}"
            ))),
        }
    }

    /// Decodes a `[batch, tokens, width]` activation tensor, checking `width`.
    ///
    /// # Errors
    /// As [`hidden_dims`](Self::hidden_dims).
    pub fn to_hidden(&self, width: usize) -> Result<(Vec<f32>, [usize; 3]), WireError> {
        let dims = self.hidden_dims(width)?;
        Ok((self.to_f32()?, dims))
    }
}

fn checked_shape(shape: &[usize]) -> Result<Vec<u32>, WireError> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(WireError::BadTensor(format!(
            "rank {} is outside 1..={MAX_RANK}",
            shape.len()
        )));
    }
    shape
        .iter()
        .map(|&d| {
            u32::try_from(d).map_err(|_| WireError::BadTensor(format!("dimension {d} too large")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        let t = WireTensor::encode(&v, &[1, 4, 6], Compression::None).unwrap();
        assert_eq!(t.to_f32().unwrap(), v);
        assert_eq!(t.data.len(), 96);
    }

    #[test]
    fn compression_halves_bytes_within_precision() {
        let v: Vec<f32> = (0..576).map(|i| (i as f32 * 0.01).sin() * 40.0).collect();
        for (c, tol) in [(Compression::F16, 2e-2), (Compression::BF16, 0.2)] {
            let t = WireTensor::encode(&v, &[1, 1, 576], c).unwrap();
            assert_eq!(t.data.len(), 576 * 2);
            for (a, b) in t.to_f32().unwrap().iter().zip(&v) {
                assert!((a - b).abs() <= tol, "{c:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn mismatched_header_is_refused() {
        let mut t = WireTensor::encode(&[1.0; 6], &[1, 2, 3], Compression::None).unwrap();
        t.shape = vec![1, 3, 3];
        assert!(matches!(t.to_f32(), Err(WireError::BadTensor(_))));
        t.shape = vec![u32::MAX, u32::MAX, u32::MAX, u32::MAX];
        assert!(matches!(t.validate(), Err(WireError::BadTensor(_))));
        t.shape = vec![];
        assert!(t.validate().is_err());
        assert!(WireTensor::encode(&[1.0; 5], &[1, 2, 3], Compression::None).is_err());
    }

    #[test]
    fn hidden_width_is_checked() {
        let t = WireTensor::encode(&[0.0; 8], &[1, 2, 4], Compression::None).unwrap();
        assert!(t.to_hidden(4).is_ok());
        assert_eq!(t.hidden_dims(4).unwrap(), [1, 2, 4]);
        assert!(t.to_hidden(8).is_err());
        let mut lying = t.clone();
        lying.shape = vec![1, 4, 4];
        assert!(lying.hidden_dims(4).is_err());
        let flat = WireTensor::encode(&[0.0; 8], &[8], Compression::None).unwrap();
        assert!(flat.to_hidden(8).is_err());
    }

    proptest! {
        #[test]
        fn random_headers_never_panic(dtype in 0u8..3, shape in proptest::collection::vec(any::<u32>(), 0..6), len in 0usize..64) {
            let dtype = [TensorDType::F32, TensorDType::F16, TensorDType::BF16][dtype as usize];
            let t = WireTensor { dtype, shape, data: vec![0; len] };
            let _ = t.to_f32();
            let _ = t.to_hidden(4);
        }
    }
}
