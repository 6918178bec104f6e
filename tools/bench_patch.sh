#!/bin/bash
# DistriFusion (`--strategy patch`) against serial and cfg, as in docs/benchmarks/distrifusion.md:
# the 1/5-width SDXL U-Net and the small SD3 MMDiT, 32x32 latents, 50 steps, 2 ranks x 1 thread,
# CFG split and --no-cfg-split, REPEATS runs each (the doc reports medians). Run on an idle
# machine from the repository root after `cargo build --release -p hybridiff-cli`.
#
#   bash tools/bench_patch.sh [OUT_DIR] [REPEATS]
set -euo pipefail
B=${HYBRIDIFF_BIN:-$PWD/target/release/hybridiff}
OUT=${1:-bench-patch}
REPEATS=${2:-3}
CONFIGS=$PWD/configs
mkdir -p "$OUT"
cd "$OUT"
[ -d sdxl-fifth ] || "$B" init --config "$CONFIGS/sdxl-fifth-unet.json" --out sdxl-fifth
[ -d sd3-small ] || "$B" init --config "$CONFIGS/sd3-small-transformer.json" --out sd3-small
for rep in $(seq 1 "$REPEATS"); do
  for m in sdxl-fifth sd3-small; do
    for split in split nosplit; do
      extra=()
      [ "$split" = nosplit ] && extra=(--no-cfg-split)
      mkdir -p "tr-$m-$split-$rep"
      echo "== run $rep $m $split, load $(cut -d' ' -f1 /proc/loadavg), $(date +%T)"
      "$B" bench --model "$m" --latent-size 32 --steps 50 --strategies serial,cfg,patch \
        --world-size 2 --threads-per-rank 1 --repeats 0 "${extra[@]}" \
        --markdown "$m-$split-$rep.md" --json "$m-$split-$rep.json" --trace-dir "tr-$m-$split-$rep" --force
    done
  done
done
