//! A linear layer (`y = x W^T`) over whichever weight representation a
//! checkpoint and device allow.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};

use crate::error::{ModelError, Result};
use crate::quant::{Kernel, QuantMatrix};

/// How activations meet quantized weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Activations and KV cache stay f32; weights are expanded inside the
    /// kernel. The default: the accuracy DESIGN.md asks for.
    #[default]
    F32,
    /// Activations rounded to 8 bits per 32-block first, as llama.cpp
    /// does, so dot products run on integers: this crate's kernels where it
    /// has them, else candle's. Opt-in: it changes answers on small models.
    Q8,
}

impl Precision {
    /// The activation dtype a server announces in its DHT record
    /// (`ServerInfo::dtype`): `f32`, or `q8` for activations rounded to 8 bits.
    pub fn activation_dtype(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8 => "q8",
        }
    }
}

/// A weight matrix `[out_features, in_features]` and the way to multiply by it.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Quantized blocks run by this crate's kernels (CPU), with activations
    /// at the given precision.
    Quant(Arc<QuantMatrix>, Precision),
    /// A plain float matrix, multiplied by candle.
    Dense(Tensor),
    /// candle's quantized matmul (8-bit activations), for formats without
    /// a kernel here.
    Candle(Arc<QMatMul>),
}

impl Linear {
    /// Wraps a float weight of shape `[out, in]`.
    pub fn dense(weight: Tensor) -> Result<Self> {
        weight.dims2()?;
        Ok(Self::Dense(weight.to_dtype(DType::F32)?))
    }

    /// Chooses the representation for a GGUF tensor.
    ///
    /// On the CPU, formats with a kernel here keep their blocks. Other
    /// quantized formats (k-quants), and every format on a GPU, are
    /// dequantized to f32 once at load, which keeps the answers exact at the
    /// cost of memory, unless `precision` asks for candle's 8-bit kernels.
    pub fn from_qtensor(q: QTensor, precision: Precision, device: &Device) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if float {
            return Self::dense(q.dequantize(device)?);
        }
        let repacked = device
            .is_cpu()
            .then(|| QuantMatrix::from_ggml(q.dtype(), &q.data().ok()?, rows, cols))
            .flatten();
        match (repacked, precision) {
            (Some(m), precision) => Ok(Self::Quant(Arc::new(m), precision).at(precision)),
            (None, Precision::Q8) => Ok(Self::Candle(Arc::new(QMatMul::from_qtensor(q)?))),
            (None, Precision::F32) => Self::dense(q.dequantize(device)?),
        }
    }

    /// The layer with activations at `precision`, its blocks (if this
    /// crate's kernels run it) arranged for the kernel that precision takes
    /// on this CPU.
    pub fn at(self, precision: Precision) -> Self {
        match self {
            Self::Quant(m, _) => {
                let m = Arc::unwrap_or_clone(m);
                let m = match precision {
                    Precision::Q8 => m.for_q8(Kernel::detect()),
                    Precision::F32 => m,
                };
                Self::Quant(Arc::new(m), precision)
            }
            other => other,
        }
    }

    /// `[out_features, in_features]`.
    pub fn dims(&self) -> [usize; 2] {
        let dims = match self {
            Self::Quant(m, _) => return [m.rows(), m.cols()],
            Self::Dense(w) => w.dims(),
            Self::Candle(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims(),
            },
        };
        [dims[0], dims.get(1).copied().unwrap_or(0)]
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.dims()[0]
    }

    /// Bytes the weights occupy.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Quant(m, _) => m.size_in_bytes(),
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Candle(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
    }

    /// Whether gradients flow back through [`forward`](Self::forward): only
    /// with f32 activations (8-bit rounding has no useful gradient).
    pub fn supports_backward(&self) -> bool {
        !matches!(self, Self::Candle(_) | Self::Quant(_, Precision::Q8))
    }

    /// Applies the layer to `x` of shape `[..., in_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // `apply_op1` records the op only when `x` takes part in a
            // gradient computation, so inference pays nothing for `bwd`.
            Self::Quant(m, precision) => x.contiguous()?.apply_op1(QuantMatmul {
                matrix: m.clone(),
                precision: *precision,
                kernel: Kernel::detect(),
                gated: false,
            })?,
            Self::Dense(w) => x.broadcast_matmul(&w.t()?)?,
            Self::Candle(q) => q.forward(x)?,
        })
    }
}

/// candle custom op that hands contiguous f32 activations to [`QuantMatrix::matmul`].
struct QuantMatmul {
    matrix: Arc<QuantMatrix>,
    precision: Precision,
    kernel: Kernel,
    /// `silu(gate) * up` of the matrix's halves ([`QuantMatrix::matmul_gated`]).
    gated: bool,
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quant-matmul-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("quantized matmul takes f32 activations")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized matmul needs contiguous activations")
        };
        let dims = layout.shape().dims();
        let cols = dims.last().copied().unwrap_or(0);
        if cols != self.matrix.cols() {
            candle_core::bail!(
                "activations have {cols} features, the weight expects {}",
                self.matrix.cols()
            )
        }
        let x = &data[start..end];
        let tokens = x.len() / cols;
        let m = &self.matrix;
        let out = match (self.precision, self.gated) {
            (Precision::F32, false) => m.matmul(x, tokens, self.kernel),
            (Precision::Q8, false) => m.matmul_q8(x, tokens, self.kernel),
            (Precision::F32, true) => m.matmul_gated(x, tokens, self.kernel),
            (Precision::Q8, true) => m.matmul_q8_gated(x, tokens, self.kernel),
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = if self.gated { m.rows() / 2 } else { m.rows() };
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    /// Gradient with respect to the activations: `grad_x = grad_y W`, with the
    /// weight expanded to f32 (weights themselves are frozen).
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.gated {
            candle_core::bail!("a gated matmul has no backward (it is applied without one)")
        }
        let w = Tensor::from_vec(
            self.matrix.dequantize(),
            (self.matrix.rows(), self.matrix.cols()),
            arg.device(),
        )?;
        Ok(Some(grad_res.broadcast_matmul(&w)?))
    }
}

/// Checks that a loaded weight has the shape the config implies.
pub(crate) fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            actual: actual.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Several projections of the same input, fused into one matrix when their
/// representations allow, so they cost one pass over the input and one
/// parallel dispatch.
#[derive(Debug, Clone)]
pub enum FusedLinear {
    /// One stacked matrix; outputs are split at these widths.
    Stacked(Linear, Vec<usize>),
    /// Matrices that cannot be stacked (mixed formats, candle's kernels).
    Separate(Vec<Linear>),
}

impl FusedLinear {
    /// Stacks `parts` if they share a representation.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let widths: Vec<usize> = parts.iter().map(Linear::out_features).collect();
        let precision = match parts.first() {
            Some(Linear::Quant(_, p)) => Some(*p),
            _ => None,
        };
        let quant: Option<Vec<&QuantMatrix>> = parts
            .iter()
            .map(|l| match l {
                Linear::Quant(m, p) if Some(*p) == precision => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        if let (Some(m), Some(p)) = (quant.and_then(|q| QuantMatrix::concat_rows(&q)), precision) {
            return Ok(Self::Stacked(Linear::Quant(Arc::new(m), p), widths));
        }
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|l| match l {
                Linear::Dense(t) => Some(t),
                _ => None,
            })
            .collect();
        if let Some(d) = dense {
            return Ok(Self::Stacked(Linear::Dense(Tensor::cat(&d, 0)?), widths));
        }
        Ok(Self::Separate(parts))
    }

    /// One output per projection, in the order given to [`FusedLinear::new`].
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Stacked(l, widths) => {
                let y = l.forward(x)?;
                let last = y.rank() - 1;
                let mut offset = 0;
                let mut outs = Vec::with_capacity(widths.len());
                for w in widths {
                    outs.push(y.narrow(last, offset, *w)?);
                    offset += w;
                }
                Ok(outs)
            }
            Self::Separate(ls) => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// `silu(gate) * up` of a two-part projection (gate over up) in one
    /// pass over the stacked matrix, where this crate's kernels run it (the
    /// CPU); `None` elsewhere, for the caller to split
    /// [`forward`](Self::forward)'s outputs instead. No gradient flows
    /// through it.
    pub fn gated(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            Self::Stacked(Linear::Quant(m, precision), widths)
                if widths[..] == [m.rows() / 2; 2] && m.gates() && x.device().is_cpu() =>
            {
                Some(x.contiguous()?.apply_op1_no_bwd(&QuantMatmul {
                    matrix: m.clone(),
                    precision: *precision,
                    kernel: Kernel::detect(),
                    gated: true,
                })?)
            }
            _ => None,
        })
    }

    /// Whether gradients flow back through every part.
    pub fn supports_backward(&self) -> bool {
        match self {
            Self::Stacked(l, _) => l.supports_backward(),
            Self::Separate(parts) => parts.iter().all(Linear::supports_backward),
        }
    }

    /// Bytes the weights occupy.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Stacked(l, _) => l.size_in_bytes(),
            Self::Separate(ls) => ls.iter().map(Linear::size_in_bytes).sum(),
        }
    }
}
