#!/usr/bin/env bash
# Makes `cargo build --release --features cuda` (and `--features cuda,nccl`) work on a
# machine with no GPU and no CUDA installed, such as this project's CPU machines: CUDA 13.0
# from NVIDIA's PyPI wheels in a venv outside the repository (the GPU machines have driver
# 580, i.e. CUDA 13.0, so nothing newer), plus what candle-core 0.11's cudarc needs to link
# dynamically: unversioned library names and a libcuda.so.1 stub (the real driver library
# is loaded at run time on the GPU machine).
#
#   bash tools/cuda-toolchain.sh [PREFIX]     # default ~/.cache/hybridiff-cuda-13.0
#   source PREFIX/env.sh                      # CUDA_HOME, PATH, CUDA_COMPUTE_CAP, ...
#   cargo build --release -p hybridiff-cli --features cuda
#
# Needs python3 with venv, a C compiler (cc) and the network to PyPI; about 1.5 GB on disk.
# Run it again at any time: it installs the pinned versions and rewrites the links.
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); set it before running to build for another
# GPU (e.g. 80 for A100, 89 for L40S/RTX 4090).
set -euo pipefail

PREFIX=${1:-${HYBRIDIFF_CUDA_PREFIX:-$HOME/.cache/hybridiff-cuda-13.0}}
PYTHON=${PYTHON:-python3}
COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# Pinned: CUDA 13.0 toolkit pieces (nvcc needs nvvm's cicc and crt's headers), the runtime
# libraries candle links (cudart, cublas, cublasLt, curand, nvrtc) and NCCL 2.30, the newest
# NCCL that cudarc 0.19's `nccl` feature names (nccl-02030).
PINS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cuda-nvrtc==13.0.88"
    "nvidia-cublas==13.0.2.14"
    "nvidia-curand==10.4.0.35"
    "nvidia-nccl-cu13==2.30.7"
)

die() {
    echo "cuda-toolchain.sh: $*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install python3 (and python3-venv)"
command -v cc >/dev/null || die "no C compiler (cc) for the libcuda stub; install gcc"

mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
if [ ! -x "$PREFIX/venv/bin/pip" ]; then
    "$PYTHON" -m venv "$PREFIX/venv" || die "could not make a venv in $PREFIX/venv (install python3-venv)"
fi
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "${PINS[@]}" \
    || die "pip could not install the CUDA wheels (is PyPI reachable?)"

SITE=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ROOT="$SITE/nvidia/cu13"
[ -x "$ROOT/bin/nvcc" ] || die "no nvcc at $ROOT/bin/nvcc after installing the wheels"

# One CUDA_HOME with bin/, include/, lib/, lib64/ and nvvm/, as a toolkit install has.
CUDA="$PREFIX/cuda"
ln -sfn "$ROOT" "$CUDA"
ln -sfn lib "$ROOT/lib64"
LIB="$ROOT/lib"
for name in cudart cublas cublasLt curand nvrtc; do
    versioned=$(find "$LIB" -maxdepth 1 -name "lib$name.so.*" | sort | head -n 1)
    [ -n "$versioned" ] || die "lib$name.so.* missing from $LIB"
    ln -sfn "$(basename "$versioned")" "$LIB/lib$name.so"
done
NCCL_LIB="$SITE/nvidia/nccl/lib"
[ -e "$NCCL_LIB/libnccl.so.2" ] || die "libnccl.so.2 missing from $NCCL_LIB"
ln -sfn "$NCCL_LIB/libnccl.so.2" "$LIB/libnccl.so.2"
ln -sfn libnccl.so.2 "$LIB/libnccl.so"
cp -f "$SITE/nvidia/nccl/include/"nccl*.h "$ROOT/include/" 2>/dev/null || true

# libcuda.so.1 comes with the GPU driver, which this machine does not have. Linking needs a
# library of that soname defining the driver API symbols cudarc calls; every name cudarc
# can load is defined as a function returning an error code. At run time the GPU machine's
# real libcuda.so.1 is found instead (the stub is in lib/stubs, never on LD_LIBRARY_PATH).
CUDARC=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' 2>/dev/null | sort | tail -n 1)
if [ -z "$CUDARC" ]; then
    die "cudarc 0.19's source is not in the cargo registry yet; run \`cargo fetch\` in the repository first"
fi
STUBS="$ROOT/lib/stubs"
mkdir -p "$STUBS"
grep -o 'load::<_F>("cu[A-Za-z0-9_]*")' "$CUDARC/src/driver/sys/mod.rs" \
    | sed 's/.*("\(.*\)")/\1/' | sort -u \
    | awk '{ printf "int %s(void) { return 999; }\n", $1 }' >"$STUBS/libcuda-stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so.1" "$STUBS/libcuda-stub.c"
ln -sfn libcuda.so.1 "$STUBS/libcuda.so"

cat >"$PREFIX/env.sh" <<ENV
# Source this before \`cargo build --features cuda\` (written by tools/cuda-toolchain.sh).
export CUDA_HOME="$CUDA"
export CUDA_PATH="$CUDA"
export PATH="$CUDA/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-$COMPUTE_CAP}"
export LIBRARY_PATH="$CUDA/lib:$STUBS\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export RUSTFLAGS="\${RUSTFLAGS:-} -L native=$STUBS"
# Run time: the binary loads libcudart, libcublas and libcurand from here; libcuda.so.1 is
# the driver's (on a machine without one, prepend $STUBS to run the binary at all).
export LD_LIBRARY_PATH="$CUDA/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV

"$CUDA/bin/nvcc" --version | tail -n 2
echo "CUDA 13.0 toolchain ready in $PREFIX; next:"
echo "  source $PREFIX/env.sh && cargo build --release -p hybridiff-cli --features cuda"
