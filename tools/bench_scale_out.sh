#!/bin/bash
# The measurements of docs/benchmarks/scale-out.md (issue 25): every strategy and layout on
# 2, 4 and 8 ranks, against serial, on
#   1. the 1/5-width SDXL U-Net and the small SD3 MMDiT (random weights, `hybridiff init`),
#      LATENT x LATENT latents, 50 steps: latency measured here, bytes, counted FLOPs per rank,
#      final-latent differences, and one trace per run;
#   2. the latency model over those traces: NVLink and PCIe 4 with the compute measured here;
#   3. the default model's images over the README's five prompts (seed 1): PSNR and SSIM of
#      each layout's images against serial's, at 64x64 (16x16 latents) and 128x128;
#   4. SDXL's layout at 1024x1024: configs/sdxl-fifth-full-depth-unet.json (SDXL's modules,
#      depths and so its every message, at 1/5 width) on 128x128 latents, STEPS_1024 steps,
#      4 and 8 ranks; predicted with compute timed by counted FLOPs, calibrated so that serial
#      takes GPU_STEP_MS per step (330: the Hybridiff paper's RTX 3090, 16.49 s / 50 steps;
#      100 and 50: faster GPUs), and links scaled to this model's bytes (1/5 of SDXL's
#      channels, f32 here against f16 there: 2.5x fewer bytes than SDXL, so 300 GB/s NVLink
#      becomes 120 GB/s and PCIe 4's 24 GB/s 9.6 GB/s, per-message latencies unchanged).
# Run from the repository root on an idle machine (every rank is a thread with 1 compute
# thread; 8 ranks share the cores). Writes OUT/ and prints the load average before each run.
#
#   cargo build --release -p hybridiff-cli
#   bash tools/bench_scale_out.sh [OUT] [LATENT]
#
# HYBRIDIFF_BIN picks the binary (default target/release/hybridiff); ONLY=sdxl5|sd3s|images|
# layout1024 runs one part; WORLDS="4 8" limits the rank counts; STEPS_1024 (default 20).
set -euo pipefail
B=${HYBRIDIFF_BIN:-$PWD/target/release/hybridiff}
OUT=${1:-scale-out}
LATENT=${2:-32}
WORLDS=${WORLDS:-"2 4 8"}
ONLY=${ONLY:-all}
CONFIGS=$PWD/configs
[ -x "$B" ] || { echo "no binary at $B: cargo build --release -p hybridiff-cli" >&2; exit 1; }
mkdir -p "$OUT"
cd "$OUT"
load() { cut -d' ' -f1-3 /proc/loadavg; }

# name | strategies | flags | smallest W
LAYOUTS=(
  "base|cfg,hybrid,patch||2"
  "patch-sync|patch|--patch-mode sync|2"
  "async1|async||2"
  "async2|async|--stride 2|3"
  "hybrid-perbranch|hybrid|--pipeline-layout per-branch|4"
  "hybrid-displaced|hybrid|--patch-mode displaced|4"
)

bench_model() {
  local m=$1 config=$2
  [ -d "$m" ] || "$B" init --config "$CONFIGS/$config" --out "$m"
  for w in $WORLDS; do
    for spec in "${LAYOUTS[@]}"; do
      IFS='|' read -r name strategies flags least <<<"$spec"
      [ "$w" -ge "$least" ] || continue
      local tag="$m-w$w-$name"
      mkdir -p "traces/$tag"
      echo "== $tag: load $(load), $(date +%T)"
      # shellcheck disable=SC2086
      "$B" bench --model "$m" --latent-size "$LATENT" --steps 50 --strategies "serial,$strategies" \
        --world-size "$w" --threads-per-rank 1 --repeats 0 $flags \
        --markdown "$tag.md" --json "$tag.json" --trace-dir "traces/$tag" | tail -n +1
    done
  done
  for d in traces/"$m"-*; do
    for link in nvlink pcie4; do
      "$B" bench --from-trace "$d" --simulate-link "$link" > "$d/predicted-$link.md"
    done
  done
}

images() {
  cat > prompts.json <<'EOF'
[{"prompt": "a red circle on a white background", "seed": 1},
 {"prompt": "a blue square on a white background", "seed": 1},
 {"prompt": "a purple circle on a white background", "seed": 1},
 {"prompt": "a yellow square on a gray background", "seed": 1},
 {"prompt": "a green triangle on a black background", "seed": 1}]
EOF
  for size in 64 128; do
    local dir="images-$size"
    mkdir -p "$dir"
    "$B" generate --prompts prompts.json --out "$dir/serial" --height "$size" --width "$size" \
      --threads-per-rank 1 > /dev/null
    for w in $WORLDS; do
      for spec in "cfg|" "hybrid|" "hybrid-perbranch|--pipeline-layout per-branch" \
                  "hybrid-displaced|--patch-mode displaced" "patch|" "patch-sync|--patch-mode sync" \
                  "async|" "async2|--stride 2"; do
        IFS='|' read -r name flags <<<"$spec"
        local strategy=${name%%-*}
        strategy=${strategy%2}
        local run="$dir/$name-w$w"
        # shellcheck disable=SC2086
        if "$B" generate --prompts prompts.json --out "$run" --height "$size" --width "$size" \
             --strategy "$strategy" --world-size "$w" --threads-per-rank 1 $flags \
             > /dev/null 2> "$run.err"; then
          "$B" compare "$dir/serial" "$run" > "$run.compare.txt"
          "$B" compare "$dir/serial" "$run" --json > "$run.compare.json"
          echo "$size $name w$w: $(grep -i mean "$run.compare.txt" | head -1)"
        else
          echo "$size $name w$w: refused: $(tail -1 "$run.err")"
        fi
      done
    done
  done
}

layout1024() {
  local m=sdxl-layout steps=${STEPS_1024:-20}
  [ -d "$m" ] || "$B" init --config "$CONFIGS/sdxl-fifth-full-depth-unet.json" --out "$m"
  for w in 4 8; do
    # `--stride 2` reaches only async; hybrid's default layout runs in the first bench.
    for spec in "base|cfg,hybrid,patch,async|--stride 2" \
                "hybrid-perbranch|hybrid|--pipeline-layout per-branch"; do
      IFS='|' read -r name strategies flags <<<"$spec"
      local tag="$m-w$w-$name"
      mkdir -p "traces/$tag"
      echo "== $tag: load $(load), $(date +%T)"
      # shellcheck disable=SC2086
      "$B" bench --model "$m" --latent-size 128 --steps "$steps" --strategies "serial,$strategies" \
        --world-size "$w" --threads-per-rank 1 --repeats 0 $flags \
        --markdown "$tag.md" --json "$tag.json" --trace-dir "traces/$tag"
      local flops
      flops=$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])); print(sum(t['steps'][0]['rank_flops']))" "traces/$tag/serial.json")
      for ms in 330 100 50; do
        local tflops
        tflops=$(python3 -c "print($flops / ($ms / 1000) / 1e12)")
        for link in "nvlink|120/5" "pcie4|9.6/10"; do
          IFS='|' read -r lname lspec <<<"$link"
          "$B" bench --from-trace "traces/$tag" --simulate-link "$lspec" --gpu-tflops "$tflops" \
            > "traces/$tag/predicted-sdxl-$lname-${ms}ms.md"
        done
      done
    done
  done
}

echo "binary $B, latents ${LATENT}x${LATENT}, load $(load), $(date -u +%FT%TZ)"
case $ONLY in
  all) bench_model sdxl5 sdxl-fifth-unet.json; bench_model sd3s sd3-small-transformer.json
       images; layout1024 ;;
  sdxl5) bench_model sdxl5 sdxl-fifth-unet.json ;;
  sd3s) bench_model sd3s sd3-small-transformer.json ;;
  images) images ;;
  layout1024) layout1024 ;;
esac
echo "done, load $(load), $(date -u +%FT%TZ)"
