#!/usr/bin/env python3
"""Generates extra denoiser parity fixtures under tests/fixtures/models/.

Needs torch, diffusers (0.42.1), safetensors, numpy.
Run from the repository root:  /work/venv/bin/python tools/make_model_fixtures.py

Each fixture is a diffusers component folder (config.json +
diffusion_pytorch_model.safetensors, float32, random weights) plus
expected.safetensors with the inputs and diffusers' output:

- unet-sd15/: SD 1.5 layout (CrossAttn, CrossAttn, Down / Up, CrossAttn, CrossAttn),
  conv proj_in/proj_out, scalar attention_head_dim, no addition embedding.
- unet-sd21/: SD 2.1 layout: linear projections, per-block attention_head_dim,
  upcast_attention, one resnet per block.
- unet-odd/: downsample_padding 0, layers_per_block and transformer_layers_per_block
  as lists, centred input, mid_block_scale_factor and resnet_out_scale_factor != 1,
  flip_sin_to_cos false, freq_shift 1, 5x5 conv_in, 1x1 conv_out, out_channels !=
  in_channels, a plain block between cross-attention blocks and a 16x24 latent.
- mmdit-sd35/: SD3.5-medium-style SD3Transformer2DModel: qk_norm rms_norm,
  dual_attention_layers [0, 1], 4 layers; a square batch of two and a non-square
  (12x20) sample of one.

U-Net expected.safetensors: sample [B, C, H, W], timestep [1], encoder_hidden_states
[B, L, D], out. MMDiT: additionally pooled_projections, and sample_wide /
encoder_hidden_states_wide / pooled_projections_wide / out_wide.

Weights are re-initialised (see `randomize`) so that every sub-module moves the output:
diffusers' own init zeroes or shrinks some layers, which would hide bugs there.
"""

import json
import math
import shutil
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "models"

torch.set_num_threads(1)


def randomize(model: torch.nn.Module, seed: int, gain: float = 1.5) -> None:
    """Matrices and kernels ~ N(0, gain^2 / fan_in); biases ~ N(0, 0.1^2); norm scales
    ~ 1 + N(0, 0.2^2). Buffers (SD3's position table) stay as diffusers builds them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in)))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights (GroupNorm, LayerNorm, RMSNorm)
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)


def save_component(model, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    # Only the two files a component needs.
    for f in folder.iterdir():
        assert f.name in ("config.json", "diffusion_pytorch_model.safetensors"), f


def describe(name: str, out: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), name
    print(f"{name}: out {tuple(out.shape)} max|out| {out.abs().max():.4g} mean|out| {out.abs().mean():.4g}")


UNETS = {
    "unet-sd15": dict(
        config=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[8, 16, 16],
            layers_per_block=2,
            norm_num_groups=4,
            cross_attention_dim=48,
            attention_head_dim=2,
            use_linear_projection=False,
        ),
        batch=2,
        hw=(16, 16),
        seq=7,
        timestep=421.0,
    ),
    "unet-sd21": dict(
        config=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[8, 16, 16],
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=40,
            attention_head_dim=[1, 2, 4],
            use_linear_projection=True,
            upcast_attention=True,
        ),
        batch=1,
        hw=(16, 16),
        seq=9,
        timestep=761.0,
    ),
    "unet-odd": dict(
        config=dict(
            sample_size=16,
            in_channels=4,
            out_channels=6,
            center_input_sample=True,
            flip_sin_to_cos=False,
            freq_shift=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[8, 12, 16],
            layers_per_block=[1, 2, 1],
            transformer_layers_per_block=[2, 1, 1],
            downsample_padding=0,
            mid_block_scale_factor=1.5,
            resnet_out_scale_factor=2.0,
            norm_num_groups=4,
            norm_eps=1e-6,
            cross_attention_dim=24,
            attention_head_dim=[2, 3, 4],
            use_linear_projection=True,
            conv_in_kernel=5,
            conv_out_kernel=1,
        ),
        batch=1,
        hw=(16, 24),
        seq=5,
        timestep=57.0,
    ),
}


def make_unet(name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**spec["config"]).eval()
    randomize(model, seed)
    folder = OUT / name
    save_component(model, folder)

    g = torch.Generator().manual_seed(seed + 1000)
    c = spec["config"]
    b, (h, w) = spec["batch"], spec["hw"]
    sample = torch.randn((b, c["in_channels"], h, w), generator=g)
    if c.get("center_input_sample"):
        sample = sample * 0.5 + 0.5  # an image-like [0, 1]-ish input
    ctx = torch.randn((b, spec["seq"], c["cross_attention_dim"]), generator=g)
    timestep = torch.tensor([spec["timestep"]], dtype=torch.float32)
    with torch.no_grad():
        out = model(sample, timestep, encoder_hidden_states=ctx).sample
    describe(name, out)
    save_file(
        {
            "sample": sample.contiguous(),
            "timestep": timestep,
            "encoder_hidden_states": ctx.contiguous(),
            "out": out.contiguous(),
        },
        str(folder / "expected.safetensors"),
    )


def make_mmdit(name: str, seed: int) -> None:
    cfg = dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**cfg).eval()
    randomize(model, seed)
    folder = OUT / name
    save_component(model, folder)
    keys = json.loads((folder / "config.json").read_text())
    assert keys["qk_norm"] == "rms_norm" and keys["dual_attention_layers"] == [0, 1], keys

    g = torch.Generator().manual_seed(seed + 1000)
    timestep = torch.tensor([981.8749], dtype=torch.float32)
    tensors = {"timestep": timestep}
    for suffix, b, (h, w), seq in [("", 2, (16, 16), 11), ("_wide", 1, (8, 12), 6)]:
        sample = torch.randn((b, 16, h, w), generator=g)
        ctx = torch.randn((b, seq, 32), generator=g)
        pooled = torch.randn((b, 32), generator=g)
        with torch.no_grad():
            out = model(
                hidden_states=sample,
                encoder_hidden_states=ctx,
                pooled_projections=pooled,
                timestep=timestep.expand(b),
            ).sample
        describe(name + suffix, out)
        tensors.update(
            {
                f"sample{suffix}": sample,
                f"encoder_hidden_states{suffix}": ctx,
                f"pooled_projections{suffix}": pooled,
                f"out{suffix}": out.contiguous(),
            }
        )
    save_file(tensors, str(folder / "expected.safetensors"))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(UNETS.items()):
        make_unet(name, spec, seed=100 + i)
    make_mmdit("mmdit-sd35", seed=200)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1e6:.2f} MB under {OUT}")


if __name__ == "__main__":
    main()
