#!/usr/bin/env python3
"""Generates the text-encoder reference fixtures under tests/fixtures/text/.

Needs torch, transformers (5.x), diffusers, tokenizers, safetensors, numpy.
Run from the repository root:  /work/venv/bin/python tools/make_text_fixtures.py

What it writes (all tiny, random weights, float32, CPU):

- clip_tokenizer_cases.json: token ids that transformers' CLIPTokenizer gives for
  edge-case texts with the real CLIP vocabulary of tests/fixtures/tiny-sdxl-pipeline
  (pad `<|endoftext|>` in tokenizer/, pad `!` in tokenizer_2/), and with
  clip-tokenizer-json/ (the small vocabulary below as a tokenizer.json only, pad `!`).
- tiny-t5/: a random T5EncoderModel (gated-gelu) and expected.safetensors with
  input_ids, last_hidden_state (float32, and float16 with transformers' float32 `wo`)
  and transformers' relative position buckets.
- tiny-sd3-text/: the text half of an SD3 pipeline folder (CLIP-L, CLIP-G with
  projection, T5 = ../tiny-t5 via symlink, a small CLIP BPE vocabulary and a small
  Unigram T5 tokenizer) and what StableDiffusion3Pipeline.encode_prompt returns, with
  and without the T5 encoder.
- tiny-sd15-text/: the text half of an SD 1.5 pipeline folder (CLIPTextModel with the
  legacy eos_token_id 2) and what StableDiffusionPipeline.encode_prompt returns.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)
from transformers.models.t5.modeling_t5 import T5Attention

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "text"
SDXL = FIX / "tiny-sdxl-pipeline"

# Enough merges that common words collapse to whole tokens; few enough to stay small.
N_MERGES = 400

LONG_PROMPT = (
    "a highly detailed photograph of an old lighthouse on a rocky cliff at sunset, waves crashing "
    "below, seagulls flying overhead, dramatic clouds, golden hour light, 35mm film, grain, "
    "cinematic composition, ultra sharp focus, intricate textures, moody atmosphere, trending on "
    "artstation, award winning, masterpiece, best quality, 8k resolution, hdr, volumetric fog, "
    "reflections on wet rocks"
)
PROMPT = "a photo of an astronaut riding a horse on the moon!"
NEG = "blurry, low quality"


def t(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def clip_tokenizer_cases() -> None:
    texts = [
        "",
        "a photo of an astronaut riding a horse on the moon",
        "hello!",
        "!hi! ! !!",
        "wow!!! it's 2024, <|endoftext|> CAFÉ  naïve\tok",
        "  leading and trailing   spaces \n",
        "emoji 🚀🌕 and ünïcödé",
        LONG_PROMPT,
        " ".join(["cat"] * 75),  # 75 words + BOS + EOS = 77: fits exactly
        " ".join(["cat"] * 76),  # one too many
    ]
    cases = []
    folders = [
        ("tokenizer", SDXL / "tokenizer"),
        ("tokenizer_2", SDXL / "tokenizer_2"),
        ("clip-tokenizer-json", OUT / "clip-tokenizer-json"),
    ]
    for name, folder in folders:
        tok = CLIPTokenizer.from_pretrained(folder)
        for text in texts:
            ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
            untruncated = tok(text).input_ids
            cases.append(
                {
                    "tokenizer": name,
                    "text": text,
                    "ids": ids,
                    "truncated": len(untruncated) > 77,
                }
            )
    write_json(OUT / "clip_tokenizer_cases.json", cases)


def small_clip_bpe(folder: Path, pad_token: str) -> None:
    """A CLIP BPE vocabulary built like CLIP's own, from the first N_MERGES merges."""
    vocab_full = json.loads((SDXL / "tokenizer" / "vocab.json").read_text())
    merges = (SDXL / "tokenizer" / "merges.txt").read_text().split("\n")[1 : N_MERGES + 1]
    by_id = sorted(vocab_full.items(), key=lambda kv: kv[1])
    tokens = [k for k, _ in by_id[:512]]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # Reload through transformers so the config files are the ones it writes.
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        pad_token=pad_token,
    )
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    # transformers 5 also writes tokenizer.json; the published SD folders have none, and
    # that is the path to exercise.
    (folder / "tokenizer.json").unlink(missing_ok=True)


def clip_tokenizer_json() -> None:
    """The small vocabulary as a tokenizer.json only, the layout of newer uploads."""
    folder = OUT / "clip-tokenizer-json"
    if folder.exists():
        shutil.rmtree(folder)
    vocab = json.loads((OUT / "tiny-sd3-text" / "tokenizer" / "vocab.json").read_text())
    merges = (OUT / "tiny-sd3-text" / "tokenizer" / "merges.txt").read_text().split("\n")[1:-1]
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token="!")
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file()
    for extra in ["vocab.json", "merges.txt"]:
        (folder / extra).unlink(missing_ok=True)


def tiny_t5_tokenizer(folder: Path) -> None:
    """A tiny Unigram tokenizer with the structure of T5's tokenizer.json."""
    words = "a photo of an astronaut riding horse on the moon blurry low quality old lighthouse sunset".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - 0.1 * i) for i, w in enumerate(words)]
    pieces += [("\u2581", -3.0)]
    pieces += [(c, -5.0 - 0.01 * i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz,.!'0123456789")]
    assert len(pieces) <= 100, len(pieces)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)


def tiny_t5(folder: Path) -> T5EncoderModel:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5EncoderModel(cfg).eval()
    # transformers' init leaves the relative bias tiny; make it matter for the test.
    with torch.no_grad():
        rab = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        rab.normal_(0.0, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (1, 80), generator=g)
    with torch.no_grad():
        out = model(ids).last_hidden_state
    half = T5EncoderModel.from_pretrained(folder, dtype=torch.float16).eval()
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        out_f16 = half(ids).last_hidden_state
    rp = torch.arange(-300, 301)
    buckets = T5Attention._relative_position_bucket(rp, True, 32, 128)
    buckets_causal = T5Attention._relative_position_bucket(rp, False, 32, 128)
    save_file(
        {
            "input_ids": t(ids.to(torch.int64)),
            "last_hidden_state": t(out),
            "last_hidden_state_f16": t(out_f16.float()),
            "relative_position": t(rp.to(torch.int64)),
            "buckets_bidirectional": t(buckets.to(torch.int64)),
            "buckets_unidirectional": t(buckets_causal.to(torch.int64)),
        },
        str(folder / "expected.safetensors"),
    )
    return model


def tiny_clip(folder: Path, with_projection: bool, seed: int, **kw):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=514 + N_MERGES,
        max_position_embeddings=77,
        num_attention_heads=2,
        num_hidden_layers=3,
        layer_norm_eps=1e-5,
        **kw,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(cfg).eval()
    # Larger than transformers' 0.02 init so that every layer changes the output visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def model_index(folder: Path, obj: dict) -> None:
    write_json(folder / "model_index.json", obj)


def sd3() -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = OUT / "tiny-sd3-text"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    small_clip_bpe(folder / "tokenizer", "<|endoftext|>")
    small_clip_bpe(folder / "tokenizer_2", "!")
    tiny_t5_tokenizer(folder / "tokenizer_3")
    te1 = tiny_clip(
        folder / "text_encoder", True, 10, hidden_size=8, intermediate_size=20, projection_dim=16,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    # CLIP-G: gelu. Its eos_token_id is the real one, the vocabulary's last token.
    te2 = tiny_clip(
        folder / "text_encoder_2", True, 11, hidden_size=16, intermediate_size=24, projection_dim=16,
        hidden_act="gelu", bos_token_id=514 + N_MERGES - 2, eos_token_id=514 + N_MERGES - 1, pad_token_id=1,
    )
    os.symlink("../tiny-t5", folder / "text_encoder_3")
    te3 = T5EncoderModel.from_pretrained(OUT / "tiny-t5").eval()
    (folder / "transformer").mkdir()
    shutil.copy(FIX / "tiny-sd3" / "transformer" / "config.json", folder / "transformer" / "config.json")
    transformer = SD3Transformer2DModel.from_pretrained(FIX / "tiny-sd3" / "transformer")
    model_index(
        folder,
        {
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": [None, None],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": [None, None],
        },
    )
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    tok3 = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer_3")

    def pipe(with_t5: bool):
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=None,
            vae=None,
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3 if with_t5 else None,
            tokenizer_3=tok3 if with_t5 else None,
        )

    out = {}
    prompt = LONG_PROMPT  # over 77 CLIP tokens and over 256 tokens of the tiny T5 vocabulary
    with torch.no_grad():
        for suffix, with_t5 in [("", True), ("_no_t5", False)]:
            pe, npe, ppe, nppe = pipe(with_t5).encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=NEG, device=torch.device("cpu")
            )
            out["prompt_embeds" + suffix] = t(pe)
            out["negative_prompt_embeds" + suffix] = t(npe)
            out["pooled_prompt_embeds" + suffix] = t(ppe)
            out["negative_pooled_prompt_embeds" + suffix] = t(nppe)
        ids1 = torch.tensor([tok1(prompt, padding="max_length", max_length=77, truncation=True).input_ids])
        ids2 = torch.tensor([tok2(prompt, padding="max_length", max_length=77, truncation=True).input_ids])
        ids3 = torch.tensor([tok3(prompt, padding="max_length", max_length=256, truncation=True).input_ids])
        out["input_ids"] = t(ids1)
        out["input_ids_2"] = t(ids2)
        out["input_ids_3"] = t(ids3)
        o1 = te1(ids1, output_hidden_states=True)
        out["clip_l_hidden_states"] = t(torch.stack(o1.hidden_states, 0)[:, 0])
        out["clip_l_last_hidden_state"] = t(o1.last_hidden_state)
        out["clip_l_text_embeds"] = t(o1.text_embeds)
        o2 = te2(ids2, output_hidden_states=True)
        out["clip_g_hidden_states"] = t(torch.stack(o2.hidden_states, 0)[:, 0])
        out["clip_g_last_hidden_state"] = t(o2.last_hidden_state)
        out["clip_g_text_embeds"] = t(o2.text_embeds)
        out["t5_last_hidden_state"] = t(te3(ids3).last_hidden_state)
    (folder / "expected").mkdir()
    save_file(out, str(folder / "expected" / "encode_prompt.safetensors"))
    write_json(
        folder / "expected" / "encode_prompt.json",
        {"prompt": prompt, "negative_prompt": NEG, "max_sequence_length": 256},
    )


def sd15() -> None:
    from diffusers import StableDiffusionPipeline

    folder = OUT / "tiny-sd15-text"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    small_clip_bpe(folder / "tokenizer", "<|endoftext|>")
    # The published SD 1.5 text encoder config carries the legacy eos_token_id 2, which
    # makes transformers pool at the argmax of the ids.
    te = tiny_clip(
        folder / "text_encoder", False, 12, hidden_size=16, intermediate_size=24, projection_dim=16,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    model_index(
        folder,
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": [None, None],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": [None, None],
            "vae": [None, None],
        },
    )
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=tok, unet=None, scheduler=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    out = {}
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, negative_prompt=None)
        out["prompt_embeds"] = t(pe)
        out["negative_prompt_embeds"] = t(npe)
        ids = torch.tensor([tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids])
        out["input_ids"] = t(ids)
        o = te(ids, output_hidden_states=True)
        out["hidden_states"] = t(torch.stack(o.hidden_states, 0)[:, 0])
        out["last_hidden_state"] = t(o.last_hidden_state)
        out["pooler_output"] = t(o.pooler_output)
    (folder / "expected").mkdir()
    save_file(out, str(folder / "expected" / "encode_prompt.safetensors"))
    write_json(folder / "expected" / "encode_prompt.json", {"prompt": PROMPT, "negative_prompt": ""})


def main() -> None:
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    tiny_t5(OUT / "tiny-t5")
    sd3()
    sd15()
    clip_tokenizer_json()
    clip_tokenizer_cases()
    for path in OUT.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)


if __name__ == "__main__":
    main()
