"""Writes models/default/MODEL_CARD.md from the training (and verification) stats."""

import json
import os
import platform

import torch


def _dir_size(path):
    rows, total = [], 0
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f == "MODEL_CARD.md":  # its own size is unknown until written; it was last time's
                continue
            p = os.path.join(root, f)
            s = os.path.getsize(p)
            total += s
            rows.append((os.path.relpath(p, path), s))
    return rows, total


def _cfg(out, sub, name):
    with open(os.path.join(out, sub, name)) as f:
        return json.load(f)


def write(out, stats, verify=None):
    a = stats["args"]
    cmd = " ".join(["python tools/train_default_model.py"] + stats.get("nondefault_flags", []))
    p = stats["params"]
    rows, total = _dir_size(out)
    vae = _cfg(out, "vae", "config.json")
    unet = _cfg(out, "unet", "config.json")
    te = _cfg(out, "text_encoder", "config.json")
    L = []
    w = L.append
    w("# hybridiff default model: \"shapes world\"\n")
    w("A tiny latent text-to-image diffusion model trained from scratch by "
      "`tools/train_default_model.py` (no pretrained weights, no downloaded data). "
      "It draws 64x64 pictures of one or two flat shapes (circle, square, triangle) in "
      "red, green, blue, yellow, purple, orange, white or black on a white, black or gray "
      "background. It is a demo / test model, not a general image generator.\n")
    w("## Layout\n")
    w("diffusers `StableDiffusionPipeline` layout (SD 1.5 style, epsilon prediction); all weights fp16 safetensors.\n")
    w("| file | bytes |\n|---|---|")
    for r, s in rows:
        w(f"| `{r}` | {s:,} |")
    w(f"| **total** | **{total:,}** |\n")
    w("## Components\n")
    w(f"- `vae/`: AutoencoderKL, block_out_channels {vae['block_out_channels']}, layers_per_block "
      f"{vae['layers_per_block']}, norm_num_groups {vae['norm_num_groups']}, latent_channels "
      f"{vae['latent_channels']} (downsampling x4: 64x64 px <-> 4x16x16 latents), mid-block attention, "
      f"scaling_factor {vae['scaling_factor']} (= 1/std of the sampled latents of 2000 training images). "
      f"{p['vae']:,} parameters.")
    w(f"- `text_encoder/`: CLIPTextModel from scratch, hidden {te['hidden_size']}, {te['num_hidden_layers']} layers, "
      f"{te['num_attention_heads']} heads, intermediate {te['intermediate_size']}, {te['hidden_act']}, vocab 49408, "
      f"77 positions. {p['text_encoder']:,} parameters (of which 49408x{te['hidden_size']} token embeddings; only "
      "the few dozen tokens of the training captions are trained, the other rows keep their random init). Trained jointly "
      "with the U-Net: a frozen random encoder would give the U-Net near-identical embeddings for "
      "\"red\" vs \"blue\" at this size.")
    w("- `tokenizer/`: the real CLIP BPE files (vocab.json / merges.txt), copied from "
      "`tests/fixtures/tiny-sdxl-pipeline/tokenizer`; captions are padded to 77 with `<|endoftext|>`, no attention mask.")
    w(f"- `unet/`: UNet2DConditionModel, SD 1.5 layout: down {unet['down_block_types']}, up "
      f"{unet['up_block_types']}, mid UNetMidBlock2DCrossAttn, block_out_channels {unet['block_out_channels']}, "
      f"layers_per_block {unet['layers_per_block']}, attention_head_dim {unet['attention_head_dim']} (= head count), "
      f"cross_attention_dim {unet['cross_attention_dim']}, norm_num_groups {unet['norm_num_groups']}, "
      f"use_linear_projection {unet['use_linear_projection']}, sample_size {unet['sample_size']}. {p['unet']:,} parameters.")
    w("- `scheduler/`: DDIMScheduler, 1000 train steps, scaled_linear 0.00085..0.012 (the schedule used in "
      "training), epsilon, timestep_spacing leading, steps_offset 1, set_alpha_to_one false, clip_sample false.\n")
    w("## Data\n")
    w(f"Generated on the fly by `tools/shapes_world.py` (numpy `default_rng`, seed {stats['seed']} for the VAE stream, "
      f"{stats['seed'] + 1} for the {a['dataset']} U-Net training images). 64x64 RGB, 2x supersampled edges. "
      "65% one shape (radius 9-14 px; 40% of these captioned without position and placed near the centre, "
      "the rest at left/right/top/bottom/center), 35% two shapes (radius 7-10 px) related by above / below / "
      "left of / right of. Shape colour never equals the background; two shapes have different colours. Caption grammar:\n")
    w("    a {colour} {shape} on a {bg} background")
    w("    a {colour} {shape} {at the left of|at the right of|at the top of|at the bottom of|in the center of} a {bg} background")
    w("    a {colour} {shape} {above|below|left of|right of} a {colour} {shape} on a {bg} background\n")
    w("Examples: " + "; ".join(f"\"{c}\"" for c in stats["caption_examples"][:5]) + ".\n")
    if stats.get("finetune"):
        w(f"Stage 2 (fine-tuning, below) draws {a['dataset']} new images (seed {stats['seed'] + 8}) and phrases each "
          f"caption afresh each time its image is drawn (`shapes_world.phrase`, its own rng stream seed+6): the "
          f"grammar above with probability {a['p_canonical']:g}, else a free phrasing: article "
          "a/an/one/the or none; in 15% of free phrasings a shape synonym (circle: disc, disk, ball, dot; square: "
          "box, block); \"{shape}, "
          "{colour}\" and \"{shape} that is {colour}\" orders (one-shape captions); the background phrase left out "
          f"with probability {a['p_no_background']:g} (then the image's background is any of the three) or said as "
          "\"on {bg}\", \"with/against a {bg} background\", \", {bg} background\"; positions without a background "
          "(\"on the left\", \"in the middle\", ...); relations over/under/beneath/to the left of/..., or only \"and\" "
          "between two shapes; capitalised first letter, upper case or title case; a trailing full stop. Why: until the "
          "2026-11 retrain every caption ended in \"on a ... background\", so \"a blue circle\" was out of distribution "
          "and drew a green circle (issue 17).\n")
        if stats.get("phrasing_examples"):
            w("Phrasing examples: " + "; ".join(f"\"{c}\"" for c in stats["phrasing_examples"][:8]) + ".\n")
    w("## Training recipe\n")
    w("Why a Python script and not candle's autograd: the model is trained with diffusers' and transformers' own "
      "classes and saved with their `save_pretrained`, so the folder is by construction a diffusers checkpoint that "
      "diffusers itself loads and samples (the verification below), and our engine then loads it through the same "
      "code path as a published checkpoint; a Rust trainer would have to re-implement the backward pass of every "
      "module and would prove nothing about loading third-party weights. The engine never needs Python.\n")
    w(f"- seeds: torch.manual_seed({stats['seed']}), np.random.seed({stats['seed']}), data rngs seed+1 / +2 / +3 / +4; "
      f"torch.set_num_threads({a['threads']}); CPU only ({platform.processor() or platform.machine()}, torch {torch.__version__}).")
    w(f"- VAE: {a['vae_steps']} AdamW steps (lr {a['vae_lr']:g}, warmup 100, cosine), batch {a['vae_batch']}, first "
      f"{a['vae_crop_steps']} steps on random 32x32 crops, then full 64x64; loss L1 + MSE + {a['vae_kl']:g} x KL (per latent element).")
    w(f"- Latents: {a['dataset']} images encoded once (posterior mean/std stored; a fresh posterior sample per training step).")
    w(f"- Stage 1, text encoder + U-Net jointly on the grammar's captions: {a['unet_steps']} AdamW steps (lr {a['lr']:g}, wd 0.01, warmup 200, cosine to 5%), batch {a['batch']}, "
      f"caption dropout {a['cond_dropout']:g} (empty string, as the pipeline's negative prompt), "
      f"epsilon MSE with min-SNR-{a['min_snr_gamma']:g} weighting, grad clip 1.0, EMA {a['ema']:g} (exported weights are the EMA).")
    w(f"- What makes the caption matter (each found necessary in earlier attempts, where the model learned shapes but "
      f"ignored the caption): offset noise {a['offset_noise']:g} (a per-sample, per-channel constant added to the "
      f"training noise: scaled_linear leaves the low frequencies, i.e. the background colour, readable from x_t even at "
      f"t = 999, so without it the U-Net takes them from x_t and never from the text); {a['high_t_frac']:g} of the "
      f"samples drawn with t in [600, 1000), where colour and layout are decided; token embeddings initialised "
      f"N(0, {a['te_embed_std']:g}) instead of CLIP's N(0, 0.02) and the text encoder at {a['te_lr_mult']:g}x the "
      f"learning rate (a from-scratch CLIP with small token rows gives near-identical outputs for every caption).")
    ft = stats.get("finetune")
    if ft:
        w(f"- Stage 2 (issue 17), text encoder + U-Net fine-tuned from stage 1's exported fp16 weights on the phrased "
          f"captions above: {a['finetune_steps']} AdamW steps (lr {a['finetune_lr']:g}, text encoder "
          f"{a['te_lr_mult']:g}x, wd 0.01, warmup 100, cosine to 5%), fresh optimiser and EMA, torch generator seed+10; "
          "everything else as stage 1; the VAE is stage 1's. Why two stages: phrasings from scratch in one stage "
          "(grammar share 0.35, tried 2026-11-30) named the colour right 99.7% of the time but drew \"circle\" and "
          "\"square\" as the same rounded square (fill ratio 0.83 vs 0.85); the shapes are learnt first on the "
          "grammar and kept while the new phrasings are learnt.")
    vl = stats["vae_loss"]
    for name, ul in (("stage 1", stats["unet_loss"] if not ft else stats["stage1"]["unet_loss"]),
                     ("stage 2", ft["unet_loss"] if ft else None)):
        if ul is None:
            continue
        if "gap_probes" in ul:
            w(f"- {name} caption sensitivity, mean|eps_c - eps_u| / mean|eps_u| on 32 fixed training latents at "
              "t = 900 (step: gap): " + ", ".join(f"{s}: {g:.3f}" for s, g in ul["gap_probes"][:: max(1, len(ul["gap_probes"]) // 10)])
              + f"; its EMA weights: {ul['gap_ema']:.3f}.")
        w(f"- {name} final losses (mean of the last steps): U-Net eps-MSE {ul['eps_mse']:.4f} (min-SNR weighted "
          f"{ul['weighted_loss']:.4f}).")
    w(f"- VAE final losses: L1 {vl['l1']:.4f}, MSE {vl['mse']:.5f}, KL {vl['kl']:.3f}.")
    w(f"- Wall time on 2 CPU threads: VAE {stats['vae_time_s']:.0f} s, encoding {stats['encode_time_s']:.0f} s, "
      f"stage 1 U-Net {stats['unet_time_s']:.0f} s"
      + (f"; stage 2 encoding {ft['encode_time_s']:.0f} s, fine-tuning {ft['unet_time_s']:.0f} s" if ft else "")
      + ".\n")
    w("Regenerate (from the repository root; overwrites models/default and docs/images/diffusers-*.png):\n")
    w(f"    {cmd}\n")
    if ft and stats["stage1"].get("from"):
        w(f"This model's stage 2 was run from the committed stage-1 model ({stats['stage1']['from']}: the default "
          "model before issue 17, trained by this command's stage 1) with `--stage1-from DIR` on a copy of it, which "
          "skips the VAE and stage 1 (~70 min); the command above runs both stages.\n")
    w("## Usage\n")
    w("64x64 output (height = width = 64), DDIM 20-50 steps, guidance 5 (3-7 works). Prompts name one or two shapes "
      "(circle, square, triangle), their colours (red, green, blue, yellow, purple, orange, white, black) and "
      "optionally a background (white, black, gray), a position or a relation, e.g. \"a blue circle\", "
      "\"a red circle on a white background\", \"a blue square above a yellow triangle on a black background\". "
      "`tools/colour_hit_rate.py` measures how often the named colour wins.\n")
    rec_path = os.path.join(out, "hybridiff.json")
    rec = json.load(open(rec_path)) if os.path.exists(rec_path) else {}
    if rec.get("cache"):
        # The cache recommendation and its numbers come from tools/bench_cache.py's sweep
        # (docs/benchmarks/cache.md), which this script does not rerun.
        w(f"`hybridiff.json` recommends 20 steps, guidance 5, Hybridiff's switching thresholds and a step cache for "
          f"`--cache default`: `{rec['cache']}` (chosen by `tools/bench_cache.py`'s sweep, `docs/benchmarks/cache.md`: "
          "at 20 steps, hybrid on 2 ranks with it computes 22 sample-forwards per image instead of serial's 40, at "
          "35.8 dB mean PSNR and SSIM 0.978 against serial without a cache over the README's 5 prompts x 3 seeds).\n")
    w("    from diffusers import StableDiffusionPipeline; import torch")
    w("    pipe = StableDiffusionPipeline.from_pretrained(\"models/default\", torch_dtype=torch.float32, safety_checker=None)")
    w("    img = pipe(\"a red circle on a white background\", num_inference_steps=20, guidance_scale=5,")
    w("               generator=torch.Generator().manual_seed(0)).images[0]\n")
    if verify:
        w("## Verification (diffusers 20-step DDIM, guidance 5, seeds 0-7)\n")
        w("| prompt | mean R,G,B | red frac | blue frac | green frac | fill ratio |\n|---|---|---|---|---|---|")
        for pr, st in verify["prompts"].items():
            fr = next((v for k, v in st.items() if k.endswith("_fill_ratio")), "")
            w(f"| {pr} | {', '.join(f'{x:.3f}' for x in st['mean_rgb'])} | {st['red_frac']} | {st['blue_frac']} | "
              f"{st['green_frac']} | {fr} |")
        if "colour_accuracy" in verify:
            w("\nColour words (\"a {colour} circle on a white background\", seeds 0-3): share of the drawn shape's pixels "
              "nearest to the named palette colour, and the palette colour most of them are nearest to.\n")
            w("| colour | named share | most pixels nearest to |\n|---|---|---|")
            for c, st in verify["colour_accuracy"].items():
                w(f"| {c} | {st['named']:.2f} | {st['most']} ({st['most_share']:.2f}) |")
        if "shape_fill" in verify:
            w("\nShape words (\"a {red|blue} {shape} on a white background\", seeds 0-3): drawn (non-background) pixels / "
              "their bounding box; the training data's shapes give circle 0.78, square 1.0, triangle 0.52 (radius 12): "
              + ", ".join(f"{k} {v:.2f}" for k, v in verify["shape_fill"].items()) + ".")
        w("\nfill ratio = pixels of the named colour / area of their bounding box (training shapes: circle 0.78, square 1.0, triangle 0.52).")
        w(f"Guidance 1 vs 5 (red circle, seeds 0-3), mean |pixel diff|: {verify['cfg1_vs_cfg5_mean_abs_diff']}.\n")
        w("rel-MAE = mean|eps_c - eps_u| / mean|eps_u| over a 50-step DDIM run, guidance 5:\n")
        for pr, r in verify["relmae"].items():
            w(f"- \"{pr}\" (seed {r['seed']}): tau1 with the paper's SDXL thresholds = {r['tau1_paper_sdxl']}; curve "
              + ", ".join(f"{v:.3f}" for v in r["curve"]))
        w("")
    w("## Limitations\n")
    w("Tiny model, under two hours of CPU training: edges are soft, squares have slightly rounded corners and "
      "circles are often lumpy. Two-shape prompts often draw one shape's kind or colour wrong, and relations are "
      "often mirrored (\"a red circle above a blue square\" puts the square on top in most seeds; \"left of\" "
      "likewise, see the last two rows of docs/images/diffusers-grid.png). Without a named background the seed "
      "picks one, mostly black or gray, rarely white. Orange and yellow are the colours most often confused "
      "(\"an orange triangle\" without a background is drawn yellow at 2 of 3 seeds in tools/colour_hit_rate.py). "
      "Words outside the vocabulary above give arbitrary shapes and colours.")
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(L) + "\n")
