//! The activations of transformers' `ACT2FN` that the text encoders use.

use std::path::Path;

use candle_core::{Result, Tensor};

use crate::Error;

/// An activation named as in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu`: the exact, erf-based GELU (`nn.GELU()`).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`, the original CLIP's.
    QuickGelu,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses `value`, the `key` of the config file `path`.
    pub(crate) fn parse(value: &str, path: &Path, key: &str) -> crate::Result<Self> {
        Ok(match value {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    key: key.into(),
                    value: format!("{other:?}"),
                    hint: "supported: gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu, silu"
                        .into(),
                })
            }
        })
    }

    pub(crate) fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}
