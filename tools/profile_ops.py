#!/usr/bin/env python3
"""Where a denoiser forward spends its time, by op, from `perf` call graphs.

Runs `hybridiff bench --strategies serial --steps 1 --only-batch B --repeats N` under
`perf record --call-graph dwarf` (user space only: perf_event_paranoid <= 2 suffices),
then sums perf's inclusive ("children") shares of the functions that implement each op,
as a fraction of all samples under `Denoiser::forward` (model loading and the one serial
step are left out). Works for builds before and after the CPU kernels of
crates/hybridiff-models/src/kernels.rs: both names of each op are listed.

Example:
    python3 tools/profile_ops.py --model /tmp/sdxl-fifth --latent-size 32 --batch 1
    python3 tools/profile_ops.py --hybridiff /tmp/old-hybridiff --model /tmp/sd3-small --batch 2

Install perf first (Debian: apt-get install linux-perf).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# op: regexes of the functions whose inclusive time is the op's (first match wins per
# function; ops do not nest, except where noted).
OPS = [
    ("linear (GEMM + bias)", [r"kernels::Linear as .*Module>::forward", r"candle_nn::linear::Linear as .*Module>::forward"]),
    ("conv2d (im2col + GEMM + bias)", [r"conv::Conv2d::forward_padded$", r"candle_nn::conv::Conv2d as .*Module>::forward"]),
    ("attention (QK^T, softmax, PV, head copies)", [r"hybridiff_models::nn::attention$"]),
    ("  of which softmax", [r"kernels::softmax_last_dim$", r"math::softmax_rows_in_place", r"SoftmaxLastDim as .*CustomOp1>::cpu_fwd"]),
    ("GEGLU / GELU", [r"kernels::geglu$", r"kernels::gelu$", r"Tensor::gelu_erf$", r"Tensor::gelu$"]),
    ("GroupNorm (+ SiLU)", [r"patch::GroupNorm::forward(_silu)?$"]),
    ("SiLU (alone)", [r"kernels::silu$", r"Tensor::silu$"]),
    ("LayerNorm (SD3: + modulation)", [r"candle_nn::ops::layer_norm$", r"mmdit::block::layer_norm$", r"mmdit::block::norm_modulate$"]),
]
TOTAL = r"hybridiff_models::denoiser::Denoiser::forward$"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hybridiff", default=os.path.join(REPO, "target", "release", "hybridiff"))
    p.add_argument("--model", required=True, help="a model folder (hybridiff init --out)")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--batch", type=int, choices=[1, 2], default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", help="keep perf.data here")
    return p.parse_args()


def main():
    a = parse_args()
    if not os.access(a.hybridiff, os.X_OK):
        sys.exit(f"profile_ops: no binary at {a.hybridiff}; build it with `cargo build --release -p hybridiff-cli`")
    tmp = None if a.keep else tempfile.TemporaryDirectory(prefix="hybridiff-prof-")
    data = a.keep or os.path.join(tmp.name, "perf.data")
    cmd = [
        "perf", "record", "-F", "999", "-e", "cpu-clock", "--call-graph", "dwarf,16384", "-o", data, "--",
        a.hybridiff, "bench", "--model", a.model, "--latent-size", str(a.latent_size), "--strategies", "serial",
        "--steps", "1", "--only-batch", str(a.batch), "--repeats", str(a.repeats),
        "--threads-per-rank", str(a.threads),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"profile_ops: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rep = subprocess.run(
        ["perf", "report", "-i", data, "--children", "--sort", "symbol", "--stdio", "-g", "none"],
        capture_output=True, text=True,
    )
    rows = []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[\.\]\s+(.*?)\s{2,}", line + "  ")
        if m:
            rows.append((float(m.group(1)), m.group(3).strip()))
    total = next((c for c, s in rows if re.search(TOTAL, s)), None)
    if not total:
        sys.exit("profile_ops: no samples under Denoiser::forward (is perf allowed? perf_event_paranoid <= 2)")
    print(f"{os.path.basename(a.model)} at {a.latent_size}x{a.latent_size}, batch {a.batch}, "
          f"{a.threads} thread(s): share of the forward's samples")
    print("| op | share |")
    print("|---|---|")
    covered = 0.0
    for name, pats in OPS:
        share = 0.0
        for c, s in rows:
            if any(re.search(p, s) for p in pats):
                share += c
        if not name.startswith("  "):
            covered += share
        print(f"| {name} | {100 * share / total:.1f}% |")
    print(f"| other (adds, reshapes, copies, embeddings) | {100 * max(total - covered, 0) / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
