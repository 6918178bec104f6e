//! Prompt encoding for text-to-image, faithful to diffusers and transformers: the CLIP
//! BPE and T5 tokenizers of a diffusers model folder, the `CLIPTextModel`,
//! `CLIPTextModelWithProjection` and `T5EncoderModel` text encoders on candle, and the
//! `encode_prompt` logic of the SD 1.x/2.x, SDXL and SD3 pipelines.

pub mod clip;
pub mod error;
pub mod prompt;
pub mod t5;
pub mod tokenizer;

mod act;

pub use clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use error::{Error, Result};
pub use prompt::{
    ClipPart, EncodedPrompts, PipelineKind, PromptEncoder, PromptParts, TokenizerSource,
};
pub use t5::{T5Config, T5EncoderModel};
pub use tokenizer::{ClipTokenizer, Encoded, T5Tokenizer};
