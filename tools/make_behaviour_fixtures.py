#!/usr/bin/env python3
"""Generates tests/fixtures/behaviour/: diffusers' outputs for the behaviours users rely on
(guidance <= 1 turns classifier-free guidance off, any size that is a multiple of the VAE
factor, an explicit empty negative prompt on SDXL).

Needs torch, diffusers (0.42.1), transformers, safetensors. Run from the repository root:
    /work/venv/bin/python tools/make_behaviour_fixtures.py

Writes:
- unet_odd_sizes.safetensors: UNet2DConditionModel forwards on latent sizes that are not
  multiples of 2^downsamples, where diffusers passes each skip's size to the upsampler
  (`forward_upsample_size`). For the tiny SDXL U-Net (`tiny-sdxl/unet`, 2 downsamples):
  `{tag}_sample`, `{tag}_encoder_hidden_states`, `{tag}_text_embeds`, `{tag}_time_ids`,
  `{tag}_out` for tags `sq9` (9x9), `wide` (10x14), `tall` (13x7); for the odd U-Net
  (`models/unet-odd`, downsample_padding 0): `odd_sample`, `odd_encoder_hidden_states`,
  `odd_out` at 11x13. All at `timestep` (a [1] tensor).
- t2i.json and t2i_{case}.safetensors: StableDiffusionXLPipeline on tiny-sdxl-pipeline/,
  DDIM, starting from `latents`, `image` = output_type "np" (float [0, 1], NHWC). The cases
  and their settings are listed in t2i.json.
"""

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "behaviour"

torch.set_num_threads(1)

CASES = {
    # Multiple of the VAE factor (8) but not of 8 * 2^downsamples (32), non-square.
    "odd_size": dict(prompt="a red circle", negative_prompt=None, guidance_scale=5.0,
                     height=72, width=88, steps=10),
    # guidance <= 1: diffusers runs only the conditional branch.
    "guidance_1_red": dict(prompt="a red circle", negative_prompt=None, guidance_scale=1.0,
                           height=64, width=64, steps=10),
    "guidance_0_blue": dict(prompt="a blue square", negative_prompt=None, guidance_scale=0.0,
                            height=64, width=64, steps=10),
    # An explicit "" is encoded; only None is zeroed (force_zeros_for_empty_prompt).
    "negative_empty": dict(prompt="a red circle", negative_prompt="", guidance_scale=5.0,
                           height=64, width=64, steps=10),
    "negative_none": dict(prompt="a red circle", negative_prompt=None, guidance_scale=5.0,
                          height=64, width=64, steps=10),
}


def unet_forwards() -> dict:
    tensors = {}
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([421.0])
    unet = UNet2DConditionModel.from_pretrained(FIX / "tiny-sdxl" / "unet").eval()
    c = unet.config
    for tag, (h, w) in {"sq9": (9, 9), "wide": (10, 14), "tall": (13, 7)}.items():
        sample = torch.randn((1, c.in_channels, h, w), generator=g)
        ctx = torch.randn((1, 6, c.cross_attention_dim), generator=g)
        text_embeds = torch.randn((1, 32), generator=g)
        time_ids = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]])
        with torch.no_grad():
            out = unet(sample, t, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        tensors.update({f"{tag}_sample": sample, f"{tag}_encoder_hidden_states": ctx,
                        f"{tag}_text_embeds": text_embeds, f"{tag}_time_ids": time_ids,
                        f"{tag}_out": out})
        print(f"{tag}: {h}x{w} max|out| {out.abs().max():.3f}")
    odd = UNet2DConditionModel.from_pretrained(FIX / "models" / "unet-odd").eval()
    sample = torch.randn((1, odd.config.in_channels, 11, 13), generator=g)
    ctx = torch.randn((1, 5, odd.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        out = odd(sample, t, encoder_hidden_states=ctx).sample
    tensors.update({"odd_sample": sample, "odd_encoder_hidden_states": ctx, "odd_out": out})
    tensors["timestep"] = t
    print(f"odd: 11x13 max|out| {out.abs().max():.3f}")
    return {k: v.contiguous() for k, v in tensors.items()}


def pipelines() -> dict:
    folder = FIX / "tiny-sdxl-pipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    meta = {}
    for name, case in CASES.items():
        # The same noise for every case of one size, so that the cases differ only in
        # the setting they are about.
        g = torch.Generator().manual_seed(100 + case["height"] + case["width"])
        h, w = case["height"] // 8, case["width"] // 8
        latents = torch.randn((1, 4, h, w), generator=g)
        kwargs = dict(prompt=case["prompt"], guidance_scale=case["guidance_scale"],
                      num_inference_steps=case["steps"], height=case["height"],
                      width=case["width"], latents=latents.clone(), output_type="np")
        if case["negative_prompt"] is not None:
            kwargs["negative_prompt"] = case["negative_prompt"]
        with torch.no_grad():
            image = pipe(**kwargs).images
        image = torch.from_numpy(image).float()
        save_file({"latents": latents.contiguous(), "image": image.contiguous()},
                  str(OUT / f"t2i_{name}.safetensors"))
        meta[name] = dict(case, scheduler="ddim")
        print(f"{name}: image {tuple(image.shape)} mean {image.mean():.4f}")
    meta["note"] = ("image is float in [0,1], NHWC, from output_type=np; negative_prompt null "
                    "means not passed (None); each run starts from its file's `latents`")
    return meta


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(unet_forwards(), str(OUT / "unet_odd_sizes.safetensors"))
    meta = pipelines()
    (OUT / "t2i.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
