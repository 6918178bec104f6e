#!/usr/bin/env python3
"""Per-image time of a long `generate --prompts` batch, early and late in the batch.

A batch whose bookkeeping grows with the number of images done (rewriting and syncing the
whole manifest after every prompt) gets slower per image as it goes; one whose bookkeeping
is constant per image does not. This runs one batch of N tiny prompts on the tiny SDXL
pipeline fixture (1 step, 64x64: the bookkeeping is a visible share of each image) with the
given binary, times every image by the moment its line appears on stdout (printed after the
image is in place and listed), and prints the mean time per image over the first and the
last tenth of the batch, and over all of it.

    python3 tools/bench_batch_manifest.py --bin target/release/hybridiff [--n 3000]

Compare two binaries in one quiet window (before and after a change), same machine and load.
Standard library only.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "hybridiff"))
    ap.add_argument("--n", type=int, default=3000, help="prompts in the batch")
    ap.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "tiny-sdxl-pipeline"))
    ap.add_argument("--threads", default="1", help="--threads-per-rank")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hybridiff-batch-bench-"))
    try:
        prompts = work / "p.txt"
        prompts.write_text("".join(f"a red circle number {i}\n" for i in range(a.n)))
        cmd = [a.bin, "generate", "--model", a.model, "--prompts", str(prompts), "--steps", "1",
               "--threads-per-rank", a.threads, "--out", str(work / "out")]
        start = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stamps = []
        for line in p.stdout:
            if ".png: " in line:
                stamps.append(time.perf_counter())
        err = p.stderr.read()
        if p.wait() != 0 or len(stamps) != a.n:
            sys.exit(f"batch failed ({len(stamps)} of {a.n} images): {err}")
        gaps = [b - x for x, b in zip([start] + stamps[:-1], stamps)]
        tenth = max(a.n // 10, 1)
        ms = lambda v: 1e3 * sum(v) / len(v)
        print(f"{a.bin}: {a.n} images, {stamps[-1] - start:.1f} s")
        print(f"  ms per image: first {tenth}: {ms(gaps[1:tenth + 1]):.2f}, "
              f"last {tenth}: {ms(gaps[-tenth:]):.2f}, all: {ms(gaps):.2f}")
        print(f"  manifest: {(work / 'out' / 'manifest.json').stat().st_size} bytes; load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
