#!/usr/bin/env python3
"""Generates tests/fixtures/noise/: PyTorch's CPU generator output that `--noise torch`
must reproduce bit for bit (crates/hybridiff-engine/src/torch_rng.rs).

Needs torch. Run from the repository root:
    /work/venv/bin/python tools/make_torch_noise_fixtures.py

Writes:
- torch_randn.safetensors + torch_randn.json: for each seed in the JSON, `seed_<S>` = the
  concatenation of torch.randn(n, generator=g) for n in `sizes`, drawn one after the other
  from one g = torch.Generator("cpu").manual_seed(S): sizes below PyTorch's vectorised
  threshold (16, the scalar Box-Muller path with its cached second value carried between
  calls), at it, and above it with and without a multiple of 16 (the recomputed tail).
- torch_randn_hashes.json: for 500 seeds, a hash of the bits of torch.randn(n) for each n
  of `hash_sizes` drawn one after the other: sum over i of bits_i * (i + 1), wrapping at
  2^64, per draw (a wider sweep than the stored values, in a few KB).
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "noise"
SEEDS = [0, 1, 42, 1234, 2**32 + 5, 2**63 + 11]
SIZES = [1, 3, 15, 16, 17, 31, 32, 33, 4, 100, 255, 1024, 7, 4 * 9 * 11, 2]
HASH_SIZES = [5, 16, 37, 4 * 8 * 8, 4 * 13 * 7]


def bits_hash(x: torch.Tensor) -> int:
    b = x.numpy().view(np.uint32).astype(np.uint64)
    w = np.arange(1, len(b) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(b * w, dtype=np.uint64))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for s in SEEDS:
        g = torch.Generator("cpu").manual_seed(s)
        tensors[f"seed_{s}"] = torch.cat([torch.randn(n, generator=g) for n in SIZES])
    save_file(tensors, str(OUT / "torch_randn.safetensors"))
    (OUT / "torch_randn.json").write_text(json.dumps(
        {"seeds": SEEDS, "sizes": SIZES, "torch": torch.__version__}, indent=1) + "\n")
    hashes = {}
    for s in range(500):
        g = torch.Generator("cpu").manual_seed(s)
        hashes[str(s)] = [str(bits_hash(torch.randn(n, generator=g))) for n in HASH_SIZES]
    (OUT / "torch_randn_hashes.json").write_text(json.dumps(
        {"sizes": HASH_SIZES, "hashes": hashes, "torch": torch.__version__}) + "\n")
    print(f"wrote {len(SEEDS)} seeds x {sum(SIZES)} values and 500 seeds of hashes")


if __name__ == "__main__":
    main()
