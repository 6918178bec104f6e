#!/usr/bin/env python3
"""Generates tests/fixtures/single-file/: tiny SD 1.x- and SDXL-shaped pipelines written
both as a diffusers folder and as a single-file checkpoint in the original (LDM / SGM)
layout, and diffusers' images for them, including images drawn from
torch.Generator("cpu").manual_seed(seed) noise.

Needs torch, diffusers (0.42.1), transformers, safetensors. Run from the repository root:
    /work/venv/bin/python tools/make_single_file_fixtures.py

Writes (all random weights, seeded, stored in f16; about 1 MB in all):
- tokenizer/, tokenizer_2/: CLIP BPE tokenizers cut to the first 300 merges (vocabulary
  814 tokens, so the text encoders' embeddings stay small), pad `<|endoftext|>` and `!`.
- sd15/ (StableDiffusionPipeline) and sd15.safetensors; sdxl/ (StableDiffusionXLPipeline,
  two text encoders of different widths, as in SDXL) and sdxl.safetensors. The single
  files are written by tools/ldm_layout.py (diffusers' conversion, inverted) and checked
  here: diffusers' `from_single_file(file, config=folder)` must give the folder's weights
  exactly and the same image bit for bit.
- expected.json and expected_<case>.safetensors: `image_u8` (the pipeline's output_type
  "np" image, rounded to 8 bits as PNG does, NHWC) for each case listed in expected.json:
  `folder_*` from given `latents` (stored), `torch_*` from
  `generator=torch.Generator("cpu").manual_seed(seed)` at sizes whose latent element count
  is below 16 (8x8 px: 4 values, PyTorch's scalar normal path), above it and not a
  multiple of 16 (16x24 px: 24 values) and a multiple (32x32 px: 64 values); those store
  `latents` = torch.randn(shape, generator=...manual_seed(seed)) too.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_layout  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "single-file"
N_MERGES = 300
PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"

torch.set_num_threads(1)


def tokenizers() -> None:
    src = FIX / "tiny-sdxl-pipeline" / "tokenizer"
    vocab = json.loads((src / "vocab.json").read_text())
    merges = (src / "merges.txt").read_text().split("\n")
    head, merges = merges[0], [m for m in merges[1:] if m][:N_MERGES]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    keep = [t for t, _ in by_id[:512 + N_MERGES]] + ["<|startoftext|>", "<|endoftext|>"]
    small = {t: i for i, t in enumerate(keep)}
    for name, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(small, ensure_ascii=False))
        (d / "merges.txt").write_text(head + "\n" + "\n".join(merges) + "\n")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": pad}
        (d / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
        cfg = dict(special, model_max_length=77, do_lower_case=True,
                   tokenizer_class="CLIPTokenizer")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def clip(hidden, layers, act, projection=None, seed=0):
    cfg = CLIPTextConfig(vocab_size=512 + N_MERGES + 2, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return model


def vae(scaling, force_upcast, seed):
    # Four levels: the VAE factor is 8, as SD's, so pixel sizes map to latent sizes as there.
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
                         scaling_factor=scaling, force_upcast=force_upcast).eval()


def randomize(model, seed):
    # diffusers zero-initialises some output layers; random values exercise every tensor.
    # Values are f16-exact: the files store f16 (half the size) and every run upcasts them
    # to the same f32 weights.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).half().float())
    return model


def sd15():
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    te = clip(16, 2, "quick_gelu", seed=2)
    tok = CLIPTokenizer.from_pretrained(OUT / "tokenizer")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=randomize(unet, 11), vae=randomize(vae(0.18215, True, 3), 12),
                                   text_encoder=randomize(te, 13), tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    texts = [("clip_sd1", pipe.text_encoder.state_dict(), None)]
    return pipe, texts


def sdxl():
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16 + 24,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 20,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    te1 = clip(16, 2, "quick_gelu", seed=5)
    te2 = clip(24, 2, "gelu", projection=20, seed=6)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=randomize(unet, 21), vae=randomize(vae(0.13025, True, 7), 22),
        text_encoder=randomize(te1, 23), text_encoder_2=randomize(te2, 24),
        tokenizer=CLIPTokenizer.from_pretrained(OUT / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(OUT / "tokenizer_2"), scheduler=sched)
    texts = [("clip_sdxl", pipe.text_encoder.state_dict(), None),
             ("open_clip_sdxl", pipe.text_encoder_2.state_dict(), None)]
    return pipe, texts


def write(name, pipe, texts):
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    # The tokenizers are the shared ones above; keep one copy.
    for t in ["tokenizer", "tokenizer_2"]:
        if (folder / t).exists():
            shutil.rmtree(folder / t)
            (folder / t).symlink_to(Path("..") / t)
    sd = ldm_layout.to_single_file(pipe.unet.state_dict(), dict(pipe.unet.config),
                                   pipe.vae.state_dict(), dict(pipe.vae.config), texts)
    sd = {k: v.detach().half().contiguous() for k, v in sd.items()}
    save_file(sd, str(OUT / f"{name}.safetensors"))
    return folder


def check_single_file(cls, name, folder):
    """diffusers' own from_single_file must read the file as the folder's weights."""
    file = OUT / f"{name}.safetensors"
    a = cls.from_pretrained(folder, torch_dtype=torch.float32)
    b = cls.from_single_file(str(file), config=str(folder), torch_dtype=torch.float32)
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        ma, mb = getattr(a, comp, None), getattr(b, comp, None)
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert set(sa) == set(sb), (comp, set(sa) ^ set(sb))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (comp, k)
    return a, b


def image_u8(pipe, **kw):
    with torch.no_grad():
        img = pipe(output_type="np", **kw).images
    return torch.from_numpy(np.round(img * 255.0).astype(np.uint8))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizers()
    meta = {}
    for name, make, cls, steps in [("sd15", sd15, StableDiffusionPipeline, 6),
                                   ("sdxl", sdxl, StableDiffusionXLPipeline, 6)]:
        pipe, texts = make()
        folder = write(name, pipe, texts)
        a, b = check_single_file(cls, name, folder)
        for p in (a, b):
            p.set_progress_bar_config(disable=True)
        # Folder vs single file in diffusers, from given latents.
        latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(5))
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                  guidance_scale=5.0, height=32, width=32)
        ia = image_u8(a, latents=latents.clone(), **kw)
        ib = image_u8(b, latents=latents.clone(), **kw)
        assert torch.equal(ia, ib), f"{name}: from_single_file gives another image"
        case = f"folder_{name}"
        save_file({"latents": latents.contiguous(), "image_u8": ia.contiguous()},
                  str(OUT / f"expected_{case}.safetensors"))
        meta[case] = dict(model=name, **kw)
        print(f"{case}: diffusers folder == from_single_file image, mean {ia.float().mean():.2f}")
        # torch.Generator noise, sizes below and above the vectorised threshold.
        for seed, (h, w) in [(0, (8, 8)), (42, (16, 24)), (7, (32, 32))]:
            g = torch.Generator("cpu").manual_seed(seed)
            kwt = dict(kw, height=h, width=w)
            img = image_u8(a, generator=g, **kwt)
            lat = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
            case = f"torch_{name}_{seed}_{h}x{w}"
            save_file({"latents": lat.contiguous(), "image_u8": img.contiguous()},
                      str(OUT / f"expected_{case}.safetensors"))
            meta[case] = dict(model=name, seed=seed, **kwt)
            print(f"{case}: {lat.numel()} latent values, mean {img.float().mean():.2f}")
    meta["note"] = ("image_u8: diffusers' output_type='np' image * 255 rounded, NHWC; folder_* "
                    "start from `latents`; torch_* from generator=torch.Generator('cpu')"
                    ".manual_seed(seed) (their `latents` = torch.randn of that generator)")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
