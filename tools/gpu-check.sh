#!/usr/bin/env bash
# The prepared device check of issue 13: run once by a session with a lent GPU (one H200),
# from the repository root, with a carried CUDA build of the binary and diffusers' wheels.
# It builds nothing and downloads nothing. Budget: under 8 minutes on one H200 (each step
# has its own timeout, all within GPU_CHECK_BUDGET_S, default 450 s; a step that fails is
# recorded and the rest still run).
#
#   bash tools/gpu-check.sh [--device cuda|cpu] [--small] [--bin PATH] [--wheels DIR]
#                           [--out DIR] [--work DIR]
#
#   --device   cuda (default) or cpu (the dry run: the same logic, no GPU)
#   --small    tiny configs (tests/fixtures' tiny SDXL U-Net and tiny SD3 MMDiT), 16x16
#              latents, 8 steps, 1 repeat: the CI dry run (crates/hybridiff-cli/tests/gpu_check.rs)
#   --bin      the hybridiff binary (default target/release/hybridiff, built here with
#              `cargo build --release -p hybridiff-cli --features cuda` after
#              tools/cuda-toolchain.sh, and carried), or that binary compressed (NAME.xz or
#              NAME.gz). Sizes measured 2026-11-30: the CUDA binary is 77 MB (73 MB
#              stripped), 18.4 MB as `strip` + `xz -9`, 27 MB gzipped; the tracked tree is
#              48.6 MB, so tree + binary.xz (67.0 MB) just fits one call's 64 MiB and the
#              diffusers wheels do not fit beside them. Carry them in two calls: the first
#              carries the .xz (an ignored path, e.g. target/gpu/hybridiff.xz: the device
#              keeps ignored files between calls while it stays warm), the second the wheels
#              and runs this script with --bin target/gpu/hybridiff.xz.
#   --wheels   a folder of wheels to install offline first (diffusers and its missing
#              dependency importlib_metadata: the device machine has torch, not diffusers)
#   --out      where the results go (default $OUT, else ./gpu-check-out); at most 8 files:
#              gpu-check.log, parity-f32.json, parity-f16.json, forward.json,
#              strategies.json, stages.json, traces.tar.gz, summary.md
#   --work     scratch space for the random-weight models (default a temp dir; ~20 GB at
#              full size)
#
# What it measures (issue 13, item 5):
#   (a) `hybridiff parity` on the fixtures in f32 and f16 on the device;
#   (b) U-Net (configs/sdxl-base-unet.json) and MMDiT (configs/sd3-medium-transformer.json)
#       with `hybridiff init` random weights: our forward at 128x128 latents, batch 1 and 2,
#       f16 (`hybridiff bench --repeats`), against diffusers' eager forward on the same
#       safetensors (tools/bench_diffusers_forward.py), with peak GPU memory (ours: the
#       device's memory in use sampled by nvidia-smi every 100 ms, minus the idle reading;
#       diffusers: torch.cuda.max_memory_allocated, and the same nvidia-smi sampling);
#   (c) serial, cfg, async and hybrid with 2 ranks sharing the one GPU: PSNR vs serial;
#   (d) per-stage compute times and bytes per step of every strategy (the traces);
#   (e) with a binary built with --features cuda,nccl: `hybridiff nccl-check` (issue 14).
#
# Lines marked `# GPU-UNRUN` have never run on a GPU (no GPU was lent to the session that
# wrote this script): the nvidia-smi memory sampling, the full-size settings (without
# --small) and the offline wheel install (--wheels, not run anywhere yet). Everything else
# runs in the CPU dry run (`--device cpu --small`), but only ever with --device cpu: the
# CUDA binary itself (`parity`, `init`, `bench` with --device cuda) has not run either.
set -uo pipefail

device=cuda
small=0
bin=target/release/hybridiff
wheels=""
out=${OUT:-gpu-check-out}
work=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --small) small=1; shift ;;
        --bin) bin=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        *) echo "gpu-check.sh: unknown argument '$1' (see the comment at the top)" >&2; exit 2 ;;
    esac
done
case "$device" in
    cuda | cpu) ;;
    *) echo "gpu-check.sh: --device must be cuda or cpu, not '$device'" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "$work" ]; then
    work=$(mktemp -d)
fi
mkdir -p "$work"
# A compressed binary (the repository and the 77 MB CUDA binary together exceed the device
# call's 64 MiB): unpacked into the work folder.
case "$bin" in
    *.gz)
        gzip -dc "$bin" >"$work/hybridiff" && chmod +x "$work/hybridiff" || exit 2
        bin=$work/hybridiff
        ;;
    *.xz)
        xz -dc "$bin" >"$work/hybridiff" && chmod +x "$work/hybridiff" || exit 2
        bin=$work/hybridiff
        ;;
esac
if [ ! -x "$bin" ]; then
    echo "gpu-check.sh: --bin $bin is not an executable (build it with --features cuda and carry it)" >&2
    exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
log=$out/gpu-check.log
PY=${PYTHON:-python3}
# A binary built with --features nccl links libnccl.so.2 and does not start without it: use
# the one of the nvidia-nccl wheel (torch's or pip's) when this python has one.
nccl_dir=$("$PY" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/libnccl.so.2" ]; then
    export LD_LIBRARY_PATH=$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} # GPU-UNRUN
fi
start=$(date +%s)
# The whole check ends by this time (8 minutes with a margin): every step's limit is cut to
# what is left, and a step with under 5 s left is skipped and recorded as failed.
deadline=$((start + ${GPU_CHECK_BUDGET_S:-450}))
failures=()

say() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$log"; }
# step NAME SECONDS CMD...: runs CMD under a timeout, its output into the log; a failure is
# recorded, not fatal.
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 5 ]; then
        say "-- $name: SKIPPED (the ${GPU_CHECK_BUDGET_S:-450} s budget is spent)"
        failures+=("$name")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (limit ${limit} s): $*"
    if timeout "$limit" "$@" >>"$log" 2>&1; then
        say "-- $name: ok"
    else
        say "-- $name: FAILED (exit $?)"
        failures+=("$name")
    fi
}

if [ "$small" = 1 ]; then
    unet_config=$repo/tests/fixtures/tiny-sdxl/unet/config.json
    mmdit_config=$repo/tests/fixtures/tiny-sd3/transformer/config.json
    latent=16
    steps=8
    repeats=1
else
    unet_config=$repo/configs/sdxl-base-unet.json        # GPU-UNRUN
    mmdit_config=$repo/configs/sd3-medium-transformer.json # GPU-UNRUN
    latent=128                                           # GPU-UNRUN
    steps=20                                             # GPU-UNRUN
    repeats=5                                            # GPU-UNRUN
fi
say "gpu-check: device $device, small $small, latents ${latent}x${latent}, $steps steps, binary $bin"
"$bin" --version >>"$log" 2>&1

if [ "$device" = cuda ]; then
    nvidia-smi >>"$log" 2>&1 # GPU-UNRUN
    # candle's cudarc links CUDA 13's libcudart, libcublas and libcurand dynamically; on the
    # device machine they come with PyTorch's nvidia-* cu13 wheels (libcuda is the driver's).
    nvlib=$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) # GPU-UNRUN
    [ -d "$nvlib" ] && export LD_LIBRARY_PATH=$nvlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} # GPU-UNRUN
    if ldd "$bin" | grep -q "not found"; then # GPU-UNRUN
        ldd "$bin" | grep "not found" | tee -a "$log" >&2 # GPU-UNRUN
        echo "gpu-check.sh: the CUDA libraries above are missing (looked in python3's nvidia/cu13/lib: '$nvlib'); set LD_LIBRARY_PATH" >&2 # GPU-UNRUN
        exit 2 # GPU-UNRUN
    fi # GPU-UNRUN
fi

# Diffusers: the machine has torch; the wheels make diffusers importable without a network.
if [ -n "$wheels" ]; then
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$work/site" "$wheels"/*.whl # GPU-UNRUN
    export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH} # GPU-UNRUN
fi
have_diffusers=1
if ! "$PY" -c 'import diffusers, torch' >>"$log" 2>&1; then
    have_diffusers=0
    say "diffusers is not importable with $PY: the diffusers timings are SKIPPED (give --wheels)"
fi

# The random-weight models, made on this machine's CPUs while the GPU checks parity.
declare -A init_pid
timeout 240 "$bin" init --config "$unet_config" --out "$work/unet-model" --force >"$work/init-unet.log" 2>&1 &
init_pid[unet]=$!
timeout 240 "$bin" init --config "$mmdit_config" --out "$work/mmdit-model" --force >"$work/init-mmdit.log" 2>&1 &
init_pid[mmdit]=$!

# (a) fixture parity, f32 and f16, on the device.
for dt in f32 f16; do
    step "parity-$dt" 120 "$bin" parity --fixtures "$repo/tests/fixtures" --device "$device" \
        --dtype "$dt" --json "$out/parity-$dt.json"
done
if [ "$device" = cpu ]; then
    # The CPU stand-in for "no host round trip on the GPU": the device-generic path, no CPU kernel.
    step parity-device-generic 120 "$bin" parity --fixtures "$repo/tests/fixtures" --device cpu \
        --dtype f32 --device-generic
fi

for m in unet mmdit; do
    if wait "${init_pid[$m]}"; then
        say "init $m: ok ($(du -sh "$work/$m-model" | cut -f1))"
    else
        say "init $m: FAILED"
        failures+=("init-$m")
    fi
    cat "$work/init-$m.log" >>"$log"
done

# Peak device memory of a command: nvidia-smi samples every 100 ms in the background.
sample_memory() { # GPU-UNRUN
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$1" 2>/dev/null # GPU-UNRUN
}

# (b) + (c) + (d): one bench per model: timed forwards at batch 1 and 2, then every strategy
# on 2 ranks (sharing the GPU), with traces. (b') diffusers on the same folder.
for m in unet mmdit; do
    ctx=77
    [ "$m" = mmdit ] && ctx=333 # SD3 pipelines: 77 CLIP + 256 T5 tokens
    mem_pid=""
    if [ "$device" = cuda ]; then
        idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1) # GPU-UNRUN
        echo "$idle" >"$work/idle-mib.txt"                                                # GPU-UNRUN
        sample_memory "$work/mem-ours-$m.txt" &                                            # GPU-UNRUN
        mem_pid=$!                                                                         # GPU-UNRUN
    fi
    mkdir -p "$work/traces/$m"
    # On the CPU, whole jobs take the GPU's code path (candle's ops, none of our CPU kernels).
    [ "$device" = cpu ] && export HYBRIDIFF_DEVICE_GENERIC=1
    step "bench-$m" 240 "$bin" bench --model "$work/$m-model" --latent-size "$latent" \
        --context-len "$ctx" --steps "$steps" --strategies serial,cfg,async,hybrid --world-size 2 \
        --repeats "$repeats" --dtype f16 --device "$device" --threads-per-rank 1 \
        --json "$work/bench-$m.json" --trace-dir "$work/traces/$m" --force
    [ -n "$mem_pid" ] && kill "$mem_pid" 2>/dev/null
    unset HYBRIDIFF_DEVICE_GENERIC
    if [ "$have_diffusers" = 1 ]; then
        mem_pid=""
        if [ "$device" = cuda ]; then
            sample_memory "$work/mem-diffusers-$m.txt" & # GPU-UNRUN
            mem_pid=$!                                  # GPU-UNRUN
        fi
        step "diffusers-$m" 150 "$PY" "$repo/tools/bench_diffusers_forward.py" \
            --model "$work/$m-model" --latent-size "$latent" --context-len "$ctx" \
            --device "$device" --dtype f16 --repeats "$repeats" --json "$work/diffusers-$m.json"
        [ -n "$mem_pid" ] && kill "$mem_pid" 2>/dev/null
    fi
done

# (e) NCCL (issue 14), only with a binary built with --features cuda,nccl: the transport's
# path on the one GPU (world size 1, one rank sending a header and a tensor to itself: NCCL
# refuses two ranks on one GPU). Two ranks, aborts and --comm nccl under mpirun stay
# untested on one GPU.
if [ "$device" = cuda ]; then
    if "$bin" nccl-check --gpu 999 2>&1 | grep -q -e "built without NCCL" -e "unrecognized subcommand"; then # GPU-UNRUN
        say "-- nccl-check: SKIPPED (the binary was built without --features nccl)" # GPU-UNRUN
    else
        step nccl-check 90 "$bin" nccl-check --gpu 0 --comm-timeout 60 # GPU-UNRUN
    fi
fi

# Every strategy's predicted latency on links between 2 GPUs, from the traces just written.
for m in unet mmdit; do
    step "from-trace-$m" 60 "$bin" bench --from-trace "$work/traces/$m" --simulate-link nvlink
done

step summary 60 "$PY" "$repo/tools/gpu_check_summary.py" --work "$work" --out "$out" \
    --device "$device" --have-diffusers "$have_diffusers"
tar -czf "$out/traces.tar.gz" -C "$work" traces 2>>"$log"

say "gpu-check: done in $(($(date +%s) - start)) s; failed steps: ${failures[*]:-none}"
[ "${#failures[@]}" -eq 0 ]
