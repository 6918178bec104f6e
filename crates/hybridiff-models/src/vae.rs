//! `AutoencoderKL` decoder (SDXL and SD3 VAEs).
