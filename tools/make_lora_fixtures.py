#!/usr/bin/env python3
"""Generates tests/fixtures/lora/: tiny LoRA files in the namings people download, and what
diffusers makes of them (`load_lora_weights` + `fuse_lora`) on the tiny pipelines of
tests/fixtures/single-file (run tools/make_single_file_fixtures.py first).

Needs torch, diffusers (0.42.1), transformers, safetensors and peft (diffusers' LoRA
loader). The files are written key by key here (not through peft's saving), as the
trainers write them. Run from the repository root:
    /work/venv/bin/python tools/make_lora_fixtures.py

Writes:
- sdxl_kohya.safetensors: kohya / A1111 naming as kohya's SDXL trainer writes it (U-Net
  modules in SGM names, `lora_unet_input_blocks_4_1_...`; `lora_te1_` / `lora_te2_`), with
  `alpha` (not the rank): attention, projection and feed-forward linears, a resnet's
  time-embedding linear, 3x3 and 1x1 convolutions (LoCon), both text encoders.
- sdxl_peft.safetensors: diffusers / PEFT naming (`unet.<module>.lora_A.weight`,
  `text_encoder_2.<module>.lora_B.weight`), a conv among them, no alpha (scale 1).
- sd15_kohya.safetensors: kohya naming with diffusers U-Net names (kohya's SD 1.x trainer),
  `lora_te_`, the 1x1-conv projections of SD 1.x.
- sd15_old.safetensors: diffusers' older naming (`...attn1.processor.to_q_lora.down.weight`,
  `...self_attn.to_k_lora.up.weight`, `...mlp.fc1.lora_linear_layer.down.weight`).
- sd3_peft.safetensors: PEFT naming for the tiny SD3 MMDiT (tests/fixtures/tiny-sd3):
  joint attention (image and context projections), feed-forward, adaLN and output
  linears; its case holds the weights diffusers' `load_lora_adapter` + `fuse_lora` on the
  transformer alone changed (no image: the fixture has no text encoders).
- expected.json and expected_<case>.safetensors for each case (files and scales listed in
  expected.json): `<component>.<weight>` = every weight the LoRA(s) changed, as diffusers
  fused it (f32), and `image_u8` = the pipeline's image from `latents` (stored) with the
  LoRA(s) fused, 8-bit NHWC.
"""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
SF = FIX / "single-file"
OUT = FIX / "lora"
PROMPT = "a red circle on a white background"

torch.set_num_threads(1)


def pair(g, out_dim, in_dim, rank, kernel=None):
    k = tuple(kernel or ())
    down = torch.randn((rank, in_dim) + k, generator=g) * 0.2
    up = torch.randn((out_dim, rank) + tuple(1 for _ in k), generator=g) * 0.2
    return down.contiguous(), up.contiguous()


def kohya(name_map: dict, sd_of: dict, rank: int, alpha: float, seed: int) -> dict:
    """name_map: kohya module name -> (component, diffusers weight name)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (comp, weight) in name_map.items():
        w = sd_of[comp][weight]
        down, up = pair(g, w.shape[0], w.shape[1], rank, w.shape[2:])
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def sgm(unet_config, module: str) -> str:
    """The SGM (LDM) name of a diffusers U-Net module, with `_` for `.` (kohya SDXL)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ldm_layout
    return ldm_layout.rename(module + ".weight", ldm_layout.unet_pairs(dict(unet_config)))[:-len(".weight")]


def states(pipe) -> dict:
    d = {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        d["text_encoder_2"] = pipe.text_encoder_2.state_dict()
    return {c: {k: v.clone() for k, v in sd.items()} for c, sd in d.items()}


def te_name(sd: dict, module: str) -> str:
    """transformers 5 saves a bare CLIPTextModel without `text_model.`."""
    return module if module + ".weight" in sd else module.removeprefix("text_model.")


def sdxl_files(pipe) -> None:
    sd = states(pipe)
    u = pipe.unet.config
    unet_modules = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "down_blocks.1.attentions.0.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
        "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
        "up_blocks.0.attentions.0.proj_out",
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.1.resnets.1.conv_shortcut",
        "mid_block.resnets.1.time_emb_proj",
    ]
    names = {"lora_unet_" + sgm(u, m).replace(".", "_"): ("unet", m + ".weight") for m in unet_modules}
    for comp, prefix, layer in [("text_encoder", "lora_te1_", 0), ("text_encoder_2", "lora_te2_", 1)]:
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"]:
            module = f"text_model.encoder.layers.{layer}.{m}"
            names[prefix + module.replace(".", "_")] = (comp, te_name(sd[comp], module) + ".weight")
    save_file(kohya(names, sd, rank=4, alpha=2.0, seed=31), str(OUT / "sdxl_kohya.safetensors"))
    g = torch.Generator().manual_seed(32)
    peft = {}
    for comp, modules in [
        ("unet", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
                  "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                  "up_blocks.0.resnets.0.conv2", "conv_in"]),
        ("text_encoder", ["text_model.encoder.layers.1.self_attn.q_proj",
                          "text_model.encoder.layers.1.self_attn.k_proj",
                          "text_model.encoder.layers.1.self_attn.v_proj",
                          "text_model.encoder.layers.1.self_attn.out_proj"]),
        ("text_encoder_2", ["text_model.encoder.layers.0.mlp.fc2",
                            "text_model.encoder.layers.0.self_attn.q_proj",
                            "text_model.encoder.layers.0.self_attn.k_proj",
                            "text_model.encoder.layers.0.self_attn.v_proj",
                            "text_model.encoder.layers.0.self_attn.out_proj"]),
    ]:
        for m in modules:
            w = sd[comp][(te_name(sd[comp], m) if comp != "unet" else m) + ".weight"]
            down, up = pair(g, w.shape[0], w.shape[1], 2, w.shape[2:])
            peft[f"{comp}.{m}.lora_A.weight"] = down
            peft[f"{comp}.{m}.lora_B.weight"] = up
    save_file(peft, str(OUT / "sdxl_peft.safetensors"))


def sd15_files(pipe) -> None:
    sd = states(pipe)
    unet_modules = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.0.attentions.0.proj_in",
        "up_blocks.1.attentions.1.proj_out",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.1.resnets.0.conv2",
        "mid_block.resnets.0.time_emb_proj",
    ]
    names = {"lora_unet_" + m.replace(".", "_"): ("unet", m + ".weight") for m in unet_modules}
    for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc2"]:
        module = f"text_model.encoder.layers.1.{m}"
        names["lora_te_" + module.replace(".", "_")] = ("text_encoder", te_name(sd["text_encoder"], module) + ".weight")
    save_file(kohya(names, sd, rank=3, alpha=1.5, seed=41), str(OUT / "sd15_kohya.safetensors"))
    g = torch.Generator().manual_seed(42)
    old = {}
    for proc in ["to_q", "to_k", "to_v", "to_out"]:
        w = sd["unet"][f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{proc if proc != 'to_out' else 'to_out.0'}.weight"]
        down, up = pair(g, w.shape[0], w.shape[1], 2)
        base = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.{proc}_lora"
        old[f"{base}.down.weight"], old[f"{base}.up.weight"] = down, up
    for proc, mod in [("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")]:
        w = sd["text_encoder"][te_name(sd["text_encoder"], f"text_model.encoder.layers.0.self_attn.{mod}") + ".weight"]
        down, up = pair(g, w.shape[0], w.shape[1], 2)
        base = f"text_encoder.text_model.encoder.layers.0.self_attn.{proc}_lora"
        old[f"{base}.down.weight"], old[f"{base}.up.weight"] = down, up
    w = sd["text_encoder"][te_name(sd["text_encoder"], "text_model.encoder.layers.0.mlp.fc1") + ".weight"]
    down, up = pair(g, w.shape[0], w.shape[1], 2)
    base = "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer"
    old[f"{base}.down.weight"], old[f"{base}.up.weight"] = down, up
    save_file(old, str(OUT / "sd15_old.safetensors"))


def sd3_case() -> dict:
    from diffusers import SD3Transformer2DModel
    folder = FIX / "tiny-sd3" / "transformer"
    t = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    g = torch.Generator().manual_seed(51)
    lora = {}
    for m in ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.1.ff.net.0.proj", "transformer_blocks.2.norm1.linear",
              "transformer_blocks.3.attn.to_out.0", "proj_out"]:
        w = sd[m + ".weight"]
        down, up = pair(g, w.shape[0], w.shape[1], 2)
        lora[f"transformer.{m}.lora_A.weight"] = down
        lora[f"transformer.{m}.lora_B.weight"] = up
    save_file(lora, str(OUT / "sd3_peft.safetensors"))
    t.load_lora_adapter({k: v.clone() for k, v in lora.items()}, prefix="transformer",
                        adapter_name="a")
    t.fuse_lora(lora_scale=0.9)
    t.unload_lora()
    changed = {f"transformer.{k}": v.contiguous() for k, v in t.state_dict().items()
               if not torch.equal(v, sd[k])}
    save_file(changed, str(OUT / "expected_sd3_peft.safetensors"))
    print(f"sd3_peft: {len(changed)} weights changed")
    return dict(model="tiny-sd3", loras=[["sd3_peft.safetensors", 0.9]], changed=sorted(changed))


CASES = {
    "sdxl_kohya": dict(model="sdxl", loras=[["sdxl_kohya.safetensors", 0.8]]),
    "sdxl_peft": dict(model="sdxl", loras=[["sdxl_peft.safetensors", 1.0]]),
    "sdxl_both": dict(model="sdxl", loras=[["sdxl_kohya.safetensors", 0.5],
                                           ["sdxl_peft.safetensors", -0.7]]),
    "sd15_kohya": dict(model="sd15", loras=[["sd15_kohya.safetensors", 1.0]]),
    "sd15_old": dict(model="sd15", loras=[["sd15_old.safetensors", 0.6]]),
}


def load(model: str):
    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(SF / model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sdxl_files(load("sdxl"))
    sd15_files(load("sd15"))
    meta = {}
    latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9))
    for case, c in CASES.items():
        pipe = load(c["model"])
        before = states(pipe)
        names = []
        for i, (f, _) in enumerate(c["loras"]):
            pipe.load_lora_weights(str(OUT / f), adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, [s for _, s in c["loras"]])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
        after = states(pipe)
        changed = {}
        for comp in after:
            for k, v in after[comp].items():
                if not torch.equal(v, before[comp][k]):
                    changed[f"{comp}.{k}"] = v.contiguous()
        with torch.no_grad():
            img = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=5,
                       guidance_scale=5.0, height=32, width=32, latents=latents.clone(),
                       output_type="np").images
        changed["image_u8"] = torch.from_numpy(np.ascontiguousarray(np.round(img * 255.0).astype(np.uint8)))
        changed["latents"] = latents.contiguous()
        save_file(changed, str(OUT / f"expected_{case}.safetensors"))
        meta[case] = dict(c, prompt=PROMPT, negative_prompt="blurry", num_inference_steps=5,
                          guidance_scale=5.0, height=32, width=32,
                          changed=sorted(k for k in changed if k not in ("image_u8", "latents")))
        print(f"{case}: {len(changed) - 2} weights changed")
    meta["sd3_peft"] = sd3_case()
    meta["note"] = ("diffusers load_lora_weights (one adapter per file), set_adapters(scales), "
                    "fuse_lora, unload_lora_weights; <component>.<weight> = fused weights that "
                    "changed; image_u8 from `latents`")
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
