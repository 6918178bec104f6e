#!/usr/bin/env python3
"""Step caching (`--cache`) measured side by side in one run: docs/benchmarks/cache.md.

Through the release binary (`cargo build --release -p hybridiff-cli` first), standard
library only:

1. The embedded default model (trained, so its features change from step to step as a
   real model's do), at each `--steps` (20 and 50), over the README's five prompts x
   `--seeds`, all in one `generate --prompts` batch per configuration: serial on one
   thread (one device), hybrid on two ranks of one thread each (two devices), and each
   of them with every cache setting of the sweep. Per configuration: the whole process's
   wall time (start, model load, text encoding, denoising, decoding, PNGs; median over
   `--repeats`, runs interleaved so that drift in the machine's load hits all alike),
   the median per-image denoising time and per-step overhead (from the manifest), the
   sample-forwards computed per image, and quality against serial without a cache:
   mean PSNR and SSIM (`hybridiff compare`), and LPIPS with `--lpips WEIGHTS` (the file
   `tools/lpips_weights.py convert` writes from torchvision's AlexNet checkpoint).
2. For time at real widths: the 1/5-width SDXL U-Net and the small SD3 MMDiT
   (`hybridiff init` from configs/, random weights), `hybridiff bench` at 32x32 latents:
   serial, serial + cache, hybrid, hybrid + cache (2 ranks x 1 thread).

Prints Markdown tables (and writes them with `--markdown F`, the raw numbers with
`--json F`), with the load average before and after.

    python3 tools/bench_cache.py [--bin target/release/hybridiff] [--steps 20,50]
        [--seeds 1,2,3] [--repeats 3] [--lpips WEIGHTS] [--specs SPEC;SPEC;...] [--no-configs]
        [--tuned HYBRIDIFF_JSON,...] [--markdown F] [--json F] [--work DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The README's prompts (tools/default_model_demo.py's picture).
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a white background",
    "a purple circle on a white background",
    "a yellow square on a gray background",
    "a green triangle on a black background",
]

# The sweep on the default model: DeepCache's interval (its speed knob) at the shallowest
# branch and one deeper branch, and TeaCache's threshold (whole-U-Net reuse); the warm-ups
# are the best of a first sweep (warmup 1-5). The recommendation in models/default is
# teacache:threshold=0.15,warmup=4. The specs are for 20 steps; at other step counts the
# warm-ups are scaled in proportion, as `--cache default` scales the recommendation.
DEFAULT_SPECS = [
    "deepcache:interval=2,branch=0,warmup=2",
    "deepcache:interval=3,branch=0,warmup=2",
    "deepcache:interval=5,branch=0,warmup=2",
    "deepcache:interval=3,branch=1,warmup=2",
    "teacache:threshold=0.05,warmup=2",
    "teacache:threshold=0.1,warmup=4",
    "teacache:threshold=0.15,warmup=4",
    "teacache:threshold=0.2,warmup=4",
    "teacache:threshold=0.3,warmup=4",
]

TWO_RANKS = ["--strategy", "hybrid", "--world-size", "2", "--threads-per-rank", "1"]
ONE_RANK = ["--strategy", "serial", "--threads-per-rank", "1"]


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def sh(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p.stdout


def scale_warmup(spec, tuned, steps):
    """`warmup=W` of a spec chosen for `tuned` steps, for a run of `steps` (as the engine's
    CacheSpec::scaled_to): the same share of the trajectory, rounded, at least 1."""
    method, _, params = spec.partition(":")
    out = []
    for kv in filter(None, params.split(",")):
        k, v = kv.split("=")
        if k == "warmup" and int(v) > 0:
            v = str(max(1, (int(v) * steps + tuned // 2) // tuned))
        out.append(f"{k}={v}")
    return method + (":" + ",".join(out) if out else "")


def generate(binary, env, batch, out, flags):
    """One whole `generate --prompts` process; returns its wall seconds and manifest."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    t = time.perf_counter()
    sh([binary, "generate", "--prompts", batch, "--out", out, *flags], env)
    wall = time.perf_counter() - t
    with open(os.path.join(out, "manifest.json")) as f:
        return wall, json.load(f)


def compare(binary, ref, out, lpips):
    v = json.loads(sh([binary, "compare", ref, out, "--json", *(["--lpips", lpips] if lpips else [])]))
    identical = v.get("identical", 0)
    return dict(psnr=v["mean_psnr_db"], ssim=v["mean_ssim"], identical=identical,
                lpips=v.get("mean_lpips"))


def default_model(a, env, work):
    lpips = a.lpips
    rows = []
    for steps in a.steps:
        items = [dict(prompt=p, seed=s) for p in PROMPTS for s in a.seeds]
        batch = os.path.join(work, f"batch-{steps}.json")
        with open(batch, "w") as f:
            json.dump(items, f)
        configs = [("serial", None), ("hybrid", None)]
        for spec in a.specs:
            spec = scale_warmup(spec, 20, steps)
            configs += [("serial", spec), ("hybrid", spec)]
        # hybrid with a `hybridiff tune --cache` choice: its thresholds, k and cache.
        tuned = {}
        for path in a.tuned:
            with open(path) as f:
                rec = json.load(f)
            if rec.get("steps") != steps:
                continue
            label = (f"hybrid L {rec['l_slope']} eps {rec['eps_slope']:g} k {rec['k']} "
                     f"tau_cap {rec['tau_cap']} ({os.path.basename(path)})")
            c = (label, rec.get("cache"))
            tuned[c] = ["--l-slope", str(rec["l_slope"]), "--eps-slope", str(rec["eps_slope"]),
                        "--k", str(rec["k"]), "--tau-cap", str(rec["tau_cap"]),
                        "--pipelined-guidance", rec.get("pipelined_guidance", "none")]
            configs.append(c)
        walls = {c: [] for c in configs}
        manifests = {}
        for rep in range(a.repeats):
            for c in configs:
                strategy, spec = c
                flags = ["--steps", str(steps), *(ONE_RANK if strategy == "serial" else TWO_RANKS),
                         *tuned.get(c, [])]
                if spec:
                    flags += ["--cache", spec]
                name = f"s{steps}-{strategy}-{spec or 'none'}"
                out = os.path.join(work, "".join(ch if ch.isalnum() or ch in "-=.," else "_" for ch in name))
                wall, manifest = generate(a.bin, env, batch, out, flags)
                walls[c].append(wall)
                manifests[c] = (out, manifest)
            print(f"steps {steps}: repeat {rep + 1} of {a.repeats} done, load {loadavg()}", flush=True)
        ref_dir, ref_manifest = manifests[("serial", None)]
        base_wall = statistics.median(walls[("serial", None)])
        base_denoise = statistics.median(e["denoise_seconds"] for e in ref_manifest)
        for c in configs:
            out, manifest = manifests[c]
            q = compare(a.bin, ref_dir, out, lpips) if c != ("serial", None) else None
            wall = statistics.median(walls[c])
            denoise = statistics.median(e["denoise_seconds"] for e in manifest)
            rows.append(dict(
                steps=steps, strategy=c[0], cache=c[1] or "-", images=len(manifest),
                wall_s=wall, wall_all=walls[c], speedup_wall=base_wall / wall,
                denoise_s=denoise, speedup_denoise=base_denoise / denoise,
                overhead_ms=statistics.median(e["step_overhead_ms"] for e in manifest),
                forwards=statistics.mean(e["forwards"] for e in manifest),
                cached_steps=statistics.mean(e.get("cached_steps", 0) for e in manifest),
                tau1=[e["tau1"] for e in manifest] if c[0] != "serial" else None,
                quality=q,
            ))
    return rows


def configs_time(a, env, work):
    rows = []
    models = [("sdxl-fifth", "configs/sdxl-fifth-unet.json", a.unet_spec),
              ("sd3-small", "configs/sd3-small-transformer.json", a.dit_spec)]
    for name, config, spec in models:
        d = os.path.join(work, name)
        if not os.path.isdir(d):
            sh([a.bin, "init", "--config", os.path.join(ROOT, config), "--out", d], env)
        runs = []
        for rep in range(a.repeats):
            j = os.path.join(work, f"{name}-{rep}.json")
            sh([a.bin, "bench", "--model", d, "--latent-size", "32", "--steps", str(a.config_steps),
                "--strategies", "serial,hybrid", "--world-size", "2", "--threads-per-rank", "1",
                "--repeats", "0", "--cache", spec, "--json", j], env)
            with open(j) as f:
                runs.append(json.load(f)["runs"])
            print(f"{name}: repeat {rep + 1} of {a.repeats} done, load {loadavg()}", flush=True)
        for i, r in enumerate(runs[0]):
            secs = [run[i]["seconds"] for run in runs]
            base = [run[0]["seconds"] for run in runs]
            rows.append(dict(model=name, strategy=r["strategy"], cache=r["cache"],
                             seconds=statistics.median(secs),
                             speedup=statistics.median(b / s for b, s in zip(base, secs)),
                             forwards=r["forwards"], cached_steps=r["cached_steps"],
                             overhead_ms=r["step_overhead_ms"], psnr_latents=r["psnr_db"]))
    return rows


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(rows, cfg_rows, lpips):
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        out += [f"### Default model, {steps} steps ({rows[0]['images']} images per run)", "",
                "| strategy | cache | whole process (s) | speedup | denoise per image (s) | denoise speedup "
                "| step overhead (ms) | forwards per image | cached steps | PSNR (dB) | SSIM |"
                + (" LPIPS |" if lpips else ""),
                "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if lpips else "")]
        for r in (r for r in rows if r["steps"] == steps):
            q = r["quality"] or {}
            psnr = "reference" if not q else fmt(q["psnr"])
            out.append(
                f"| {r['strategy']} | {r['cache']} | {r['wall_s']:.2f} | {r['speedup_wall']:.2f}x "
                f"| {r['denoise_s']:.3f} | {r['speedup_denoise']:.2f}x | {r['overhead_ms']:.2f} "
                f"| {r['forwards']:.1f} | {r['cached_steps']:.1f} | {psnr} | {fmt(q.get('ssim'), '.4f')} |"
                + (f" {fmt(q.get('lpips'), '.4f')} |" if lpips else ""))
        out.append("")
    if cfg_rows:
        out += ["### Random-weight models at real widths, 32x32 latents (time)", "",
                "| model | strategy | cache | latency (s) | speedup | forwards | cached steps "
                "| step overhead (ms) | latent PSNR vs serial (dB) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in cfg_rows:
            out.append(f"| {r['model']} | {r['strategy']} | {r['cache']} | {r['seconds']:.3f} "
                       f"| {r['speedup']:.2f}x | {r['forwards']:.1f} | {r['cached_steps']} "
                       f"| {r['overhead_ms']:.2f} | {fmt(r['psnr_latents'])} |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/hybridiff"))
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lpips", help="LPIPS weights (tools/lpips_weights.py convert) for compare --lpips")
    ap.add_argument("--specs", default=";".join(DEFAULT_SPECS),
                    help="cache settings of the default model's sweep, separated by ;")
    ap.add_argument("--unet-spec", default="deepcache:interval=3,branch=0,warmup=3")
    ap.add_argument("--dit-spec", default="teacache:threshold=0.1,warmup=3")
    ap.add_argument("--config-steps", type=int, default=20)
    ap.add_argument("--no-configs", action="store_true", help="only the default model")
    ap.add_argument("--tuned", default="",
                    help="hybridiff.json files written by `hybridiff tune --cache` (comma-separated): "
                         "a hybrid row with each one's thresholds, k and cache, at its steps")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed)")
    a = ap.parse_args()
    a.steps = [int(s) for s in a.steps.split(",")]
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.specs = [s for s in a.specs.split(";") if s]
    a.tuned = [t for t in a.tuned.split(",") if t]
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"{a.bin}: no binary; run `cargo build --release -p hybridiff-cli` first")
    work = a.work or tempfile.mkdtemp(prefix="hybridiff-cache-bench-")
    os.makedirs(work, exist_ok=True)
    # The default model unpacks once into this cache, outside the timed runs.
    env = {**os.environ, "HYBRIDIFF_CACHE": os.path.join(work, "model-cache")}
    sh([a.bin, "generate", "--prompt", PROMPTS[0], "--steps", "2", "--out", os.path.join(work, "warm.png")], env)
    before = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = default_model(a, env, work)
    cfg_rows = [] if a.no_configs else configs_time(a, env, work)
    after = loadavg()
    lpips = any((r["quality"] or {}).get("lpips") is not None for r in rows)
    md = (f"Measured {started} with `python3 tools/bench_cache.py {' '.join(sys.argv[1:])}`; "
          f"load average before {before}, after {after}; {os.cpu_count()} cores.\n\n"
          + markdown(rows, cfg_rows, lpips))
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(started=started, load_before=before, load_after=after, argv=sys.argv[1:],
                           default_model=rows, configs=cfg_rows), f, indent=1)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
