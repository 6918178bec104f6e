#!/usr/bin/env python3
"""Our denoiser forward vs diffusers' (PyTorch eager) on the CPU, at equal threads.

For each model and latent size below, and each thread count, runs `hybridiff bench`
(serial, --threads-per-rank T) and tools/bench_diffusers_forward.py (--threads T) on
the SAME random weights (a folder written by `hybridiff init` from configs/), in
alternation (ours, theirs, ours, theirs), and prints the median forward time of batch 1
and batch 2 for each, and ours / PyTorch (below 1.0: we are faster). Also writes the
table as Markdown with --markdown.

Needs a release build (`cargo build --release -p hybridiff-cli`) and torch + diffusers
in the Python running this script. Measure on an idle machine: the ratio of two runs
made back to back is what counts; absolute times vary from machine to machine.

Example:
    python3 tools/bench_cpu.py                         # all cases, 1 and 2 threads
    python3 tools/bench_cpu.py --cases unet32 --threads 1 --repeats 5
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config, latent size, text tokens)
CASES = {
    "unet32": ("configs/sdxl-fifth-unet.json", 32, 77),
    "unet64": ("configs/sdxl-fifth-unet.json", 64, 77),
    "sd3small": ("configs/sd3-small-transformer.json", 32, 77),
}


def thread_list(text):
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts such as 1,2, not {text!r}")
    if not threads or any(t < 1 for t in threads):
        raise argparse.ArgumentTypeError(f"expected thread counts of at least 1, not {text!r}")
    return threads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hybridiff", default=os.path.join(REPO, "target", "release", "hybridiff"),
                   help="the hybridiff binary (default: target/release/hybridiff)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    p.add_argument("--threads", default="1,2", type=thread_list, help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per batch and run (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (default 2)")
    p.add_argument("--work", help="folder for the random-weight models (default: a temporary one)")
    p.add_argument("--markdown", help="also write the table here")
    return p.parse_args()


def run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"bench_cpu: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r


def ours(a, model, size, ctx, threads, out):
    run([a.hybridiff, "bench", "--model", model, "--latent-size", str(size), "--context-len", str(ctx),
         "--strategies", "serial", "--steps", "1", "--threads-per-rank", str(threads),
         "--repeats", str(a.repeats), "--json", out])
    with open(out) as f:
        return json.load(f)["forward_seconds"]


def theirs(a, model, size, ctx, threads, out):
    run([sys.executable, os.path.join(REPO, "tools", "bench_diffusers_forward.py"), "--model", model,
         "--latent-size", str(size), "--context-len", str(ctx), "--device", "cpu", "--dtype", "f32",
         "--threads", str(threads), "--repeats", str(a.repeats), "--json", out])
    with open(out) as f:
        return json.load(f)["forward_seconds"]


def main():
    a = parse_args()
    if not os.access(a.hybridiff, os.X_OK):
        sys.exit(f"bench_cpu: no binary at {a.hybridiff}; build it with `cargo build --release -p hybridiff-cli`")
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if not cases:
        sys.exit(f"bench_cpu: --cases names no case; choose from {', '.join(CASES)}")
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_cpu: run this with a Python that has torch and diffusers ({e})")
    for c in cases:
        if c not in CASES:
            sys.exit(f"bench_cpu: unknown case {c!r}; choose from {', '.join(CASES)}")
    threads = a.threads
    # A temporary folder (the random-weight models are 55-193 MB) goes when the run ends.
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="hybridiff-bench-cpu-")
    work = a.work or tmp.name
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"{a.rounds} alternating runs x {a.repeats} forwards, medians",
        "",
        "| model | latents | threads | batch | ours (s) | PyTorch (s) | ours / PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for c in cases:
        config, size, ctx = CASES[c]
        model = os.path.join(work, os.path.splitext(os.path.basename(config))[0])
        if not os.path.isdir(model):
            run([a.hybridiff, "init", "--config", os.path.join(REPO, config), "--out", model])
        for t in threads:
            mine, ref = {"batch1": [], "batch2": []}, {"batch1": [], "batch2": []}
            for r in range(a.rounds):
                o = ours(a, model, size, ctx, t, os.path.join(work, "ours.json"))
                p = theirs(a, model, size, ctx, t, os.path.join(work, "theirs.json"))
                for b in ("batch1", "batch2"):
                    mine[b].append(o[b])
                    ref[b].append(p[b])
            for b in ("batch1", "batch2"):
                m, q = statistics.median(mine[b]), statistics.median(ref[b])
                line = f"| {c} ({os.path.basename(config)}) | {size}x{size} | {t} | {b[-1]} | {m:.4f} | {q:.4f} | {m / q:.2f}x |"
                lines.append(line)
                print(line, flush=True)
    if a.markdown:
        tmp = a.markdown + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
