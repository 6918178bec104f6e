"""Diffusers -> original (LDM / SGM) checkpoint names, the inverse of diffusers'
`single_file_utils` conversions (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), as diffusers' own
scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py lay a single file out.
A fixture helper (no CI use): every file it writes is read back with diffusers'
from_single_file by the scripts that use it, which checks it against diffusers' forward
conversion.

    to_single_file(unet_sd, unet_config, vae_sd, vae_config, texts) -> dict name -> tensor

`texts` is a list of (kind, state_dict, config) with kind "clip_sd1", "clip_sdxl" (first
SDXL encoder), "open_clip_sd2" or "open_clip_sdxl" (second SDXL encoder). Values may be
torch tensors or (shape, dtype) placeholders: only names, reshapes and concatenations are
applied (see `Shape`).
"""

from typing import Callable

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
               ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
            ("to_out.0", "proj_out")]


class Shape:
    """A tensor stand-in (shape only) for header-only files."""

    def __init__(self, shape, dtype="F16"):
        self.shape = tuple(shape)
        self.dtype = dtype

    def reshape(self, *shape):
        return type(self)(shape, self.dtype)

    def t(self):
        return type(self)(tuple(reversed(self.shape)), self.dtype)


def _reshape(t, shape):
    return t.reshape(*shape)


def _cat_rows(ts):
    if isinstance(ts[0], Shape):
        return type(ts[0])((sum(t.shape[0] for t in ts),) + ts[0].shape[1:], ts[0].dtype)
    import torch
    return torch.cat(ts, dim=0)


def unet_pairs(cfg) -> list:
    """(diffusers module prefix, LDM prefix, renames) for a UNet2DConditionModel config."""
    pairs = [("time_embedding.linear_1", "time_embed.0", []),
             ("time_embedding.linear_2", "time_embed.2", []),
             ("conv_in", "input_blocks.0.0", []),
             ("conv_norm_out", "out.0", []), ("conv_out", "out.2", [])]
    if cfg.get("addition_embed_type") == "text_time":
        pairs += [("add_embedding.linear_1", "label_emb.0.0", []),
                  ("add_embedding.linear_2", "label_emb.0.2", [])]
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    lpb = lpb if isinstance(lpb, list) else [lpb] * n
    i = 1
    for b in range(n):
        for l in range(lpb[b]):
            pairs.append((f"down_blocks.{b}.resnets.{l}", f"input_blocks.{i}.0", UNET_RESNET))
            if cfg["down_block_types"][b].startswith("CrossAttn"):
                pairs.append((f"down_blocks.{b}.attentions.{l}", f"input_blocks.{i}.1", []))
            i += 1
        if b != n - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.0.op", []))
            i += 1
    pairs += [("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
              ("mid_block.attentions.0", "middle_block.1", []),
              ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    rev = list(reversed(lpb))
    i = 0
    for b in range(n):
        attn = cfg["up_block_types"][b].startswith("CrossAttn")
        for l in range(rev[b] + 1):
            pairs.append((f"up_blocks.{b}.resnets.{l}", f"output_blocks.{i}.0", UNET_RESNET))
            if attn:
                pairs.append((f"up_blocks.{b}.attentions.{l}", f"output_blocks.{i}.1", []))
            if l == rev[b] and b != n - 1:
                j = 2 if attn else 1
                pairs.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{j}.conv", []))
            i += 1
    return pairs


def vae_pairs(cfg) -> list:
    n = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    pairs = []
    for side in ["encoder", "decoder"]:
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", []),
                  (f"{side}.conv_out", f"{side}.conv_out", []),
                  (f"{side}.conv_norm_out", f"{side}.norm_out", []),
                  (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", VAE_RESNET),
                  (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", VAE_RESNET),
                  (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", VAE_ATTN)]
    pairs += [("quant_conv", "quant_conv", []), ("post_quant_conv", "post_quant_conv", [])]
    for i in range(n):
        up = n - 1 - i
        for j in range(lpb + 1):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET))
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", []))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv", []))
    return pairs


def rename(name: str, pairs: list) -> str:
    best = None
    for d, l, ren in pairs:
        if name.startswith(d + ".") and (best is None or len(d) > len(best[0])):
            best = (d, l, ren)
    if best is None:
        raise KeyError(f"no LDM name for {name}")
    d, l, ren = best
    rest = name[len(d) + 1:]
    for a, b in ren:
        if rest == a or rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return f"{l}.{rest}"


def convert_unet(sd: dict, cfg) -> dict:
    pairs = unet_pairs(cfg)
    return {"model.diffusion_model." + rename(k, pairs): v for k, v in sd.items()}


def convert_vae(sd: dict, cfg) -> dict:
    pairs = vae_pairs(cfg)
    out = {}
    for k, v in sd.items():
        n = rename(k, pairs)
        # The LDM VAE's attention projections are 1x1 convolutions.
        if ".mid.attn_1." in n and n.endswith(".weight") and not n.endswith("norm.weight"):
            v = _reshape(v, tuple(v.shape) + (1, 1))
        out["first_stage_model." + n] = v
    return out


def convert_clip(sd: dict, prefix: str) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k
        out[prefix + name] = v
    return out


OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def convert_open_clip(sd: dict, prefix: str, layers_in_file: int | None = None,
                      pad_layer: Callable | None = None) -> dict:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP text tower names. q, k, v
    are fused into in_proj; text_projection.weight is transposed. `layers_in_file` and
    `pad_layer(i)` add layers past the model's (SD 2.x files hold 24, its encoder uses 23)."""
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
          for k, v in sd.items() if not k.endswith("position_ids")}
    out = {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for k, v in sd.items():
        if k in fixed:
            out[prefix + fixed[k]] = v
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].t()
    n = 0
    while f"text_model.encoder.layers.{n}.layer_norm1.weight" in sd:
        n += 1
    for i in range(n):
        base = f"text_model.encoder.layers.{i}."
        for a, b in OPEN_CLIP_LAYER:
            for p in ["weight", "bias"]:
                out[f"{prefix}transformer.resblocks.{i}.{b}.{p}"] = sd[f"{base}{a}.{p}"]
        for p in ["weight", "bias"]:
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}"] = _cat_rows(
                [sd[f"{base}self_attn.{q}_proj.{p}"] for q in "qkv"])
    if layers_in_file and pad_layer:
        for i in range(n, layers_in_file):
            out.update({prefix + k: v for k, v in pad_layer(i).items()})
    return out


TEXT_PREFIX = {"clip_sd1": "cond_stage_model.transformer.",
               "clip_sdxl": "conditioner.embedders.0.transformer.",
               "open_clip_sd2": "cond_stage_model.model.",
               "open_clip_sdxl": "conditioner.embedders.1.model."}


def to_single_file(unet_sd, unet_cfg, vae_sd, vae_cfg, texts) -> dict:
    out = {}
    out.update(convert_unet(unet_sd, unet_cfg))
    out.update(convert_vae(vae_sd, vae_cfg))
    for kind, sd, extra in texts:
        prefix = TEXT_PREFIX[kind]
        if kind.startswith("open_clip"):
            out.update(convert_open_clip(sd, prefix, **(extra or {})))
        else:
            out.update(convert_clip(sd, prefix))
    return out
