//! `UNet2DConditionModel` (SD 1.5, SD 2.1, SDXL).
