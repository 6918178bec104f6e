#!/usr/bin/env bash
# The CPU bench table with MPI processes next to in-process threads: serial, cfg, async and
# hybrid on the 1/5-width SDXL U-Net (random weights), 32x32 latents, 50 steps, 1 thread per
# rank, REPEATS times; prints the per-run tables and the medians (docs/benchmarks/mpi.md).
#
# Usage: bash tools/bench_mpi.sh [BIN] [REPEATS]   (BIN: an MPI build, --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${1:-target/release/hybridiff}")
REPEATS=${2:-3}
STEPS=${STEPS:-50}
OUT=${OUT:-$(mktemp -d)}
MODEL="$OUT/sdxl-fifth"
[ -d "$MODEL" ] || "$BIN" init --config configs/sdxl-fifth-unet.json --out "$MODEL" >/dev/null

for i in $(seq 1 "$REPEATS"); do
    echo "== run $i, load: $(cut -d' ' -f1-3 /proc/loadavg)"
    # --bind-to none: rank 0 also runs the thread rows, whose ranks need a core each.
    # EXTRA holds several flags: split on purpose.
    # shellcheck disable=SC2086
    mpirun --allow-run-as-root --bind-to none -np 2 "$BIN" bench --model "$MODEL" \
        --latent-size 32 --steps "$STEPS" --threads-per-rank 1 --repeats 3 \
        --strategies serial,cfg,async,hybrid --transport threads,mpi \
        ${EXTRA:-} --json "$OUT/run$i.json" --trace-dir "$OUT/traces$i" --force
done

python3 - "$OUT" "$REPEATS" <<'EOF'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{out}/run{i}.json")) for i in range(1, n + 1)]
keys = [(r["strategy"], r["transport"]) for r in runs[0]["runs"]]

def trace(i, strategy, transport):
    name = strategy if transport == "threads" else f"{strategy}-{transport}"
    return json.load(open(f"{out}/traces{i}/{name}.json"))

def split(t):
    """Per step: the slowest rank's compute, and the rest of the step (waits, transfers,
    the sampler's update), summed over the steps."""
    comp = sum(max(s["rank_compute_seconds"]) for s in t["steps"])
    return comp, sum(s["wall_seconds"] for s in t["steps"]) - comp

med = statistics.median
print(f"\nmedians of {n} runs (min-max of latency in brackets)\n")
print("| strategy | ranks | transport | latency (s) | speedup vs serial | slowest rank's compute (s) | rest of the steps (ms/step) | bytes sent | max abs diff vs serial | tau1 | tau2 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for k in keys:
    rows = [next(r for r in run["runs"] if (r["strategy"], r["transport"]) == k) for run in runs]
    secs = [r["seconds"] for r in rows]
    sp = [r["speedup"] for r in rows]
    parts = [split(trace(i + 1, *k)) for i in range(n)]
    steps = len(trace(1, *k)["steps"])
    r0 = rows[0]
    print(f"| {k[0]} | {r0['world_size']} | {k[1]} | {med(secs):.3f} "
          f"[{min(secs):.3f}-{max(secs):.3f}] | {med(sp):.2f}x | {med(p[0] for p in parts):.3f} "
          f"| {1000 * med(p[1] for p in parts) / steps:.2f} | {r0['bytes_sent']} "
          f"| {r0['max_abs_diff']:.3e} | {r0['tau1'] if r0['tau1'] is not None else '-'} "
          f"| {r0['tau2'] if r0['tau2'] is not None else '-'} |")
fw = [run["forward_seconds"] for run in runs if run.get("forward_seconds")]
if fw:
    print(f"\ndenoiser forward (median of runs): batch 1 {statistics.median(f['batch1'] for f in fw):.4f} s, "
          f"batch 2 {statistics.median(f['batch2'] for f in fw):.4f} s")
EOF
