//! Diffusers-faithful models on candle: the SDXL/SD U-Net (`UNet2DConditionModel`), the
//! VAE (`AutoencoderKL`), and the weight loader. Module paths equal diffusers' weight
//! names, so any diffusers checkpoint loads. Nothing here knows about distribution: a
//! denoiser exposes its forward as a sequence of named modules over an explicit state,
//! and the engine decides who runs which.

pub mod conv;
pub mod denoiser;
pub mod error;
pub mod host;
pub mod kernels;
pub mod ldm;
pub mod lora;
pub mod lpips;
pub mod memory;
pub mod weights;

pub use denoiser::{Conditioning, Denoiser, OutputRef, State};
pub use error::{Error, Result};
pub use patch::{Band, PatchContext};
pub mod mmdit;
pub mod nn;
pub mod parity;
pub mod patch;
pub mod single_file;
pub mod unet;
pub mod vae;
