#!/usr/bin/env python3
"""`hybridiff tune` on the cases of issue 26, with the time each takes (docs/benchmarks/tune.md).

Cases: the embedded default model (a pipeline: quality on decoded images), the 1/5-width
SDXL U-Net (configs/sdxl-fifth-unet.json) and the small SD3 MMDiT
(configs/sd3-small-transformer.json), both random-weight folders from `hybridiff init`
(no text encoder or VAE: seeded random prompt embeddings, quality = PSNR of the final
latents against serial's), each at 20 and 50 steps. Prints one Markdown table (and
writes it with --markdown), with the load average before and after each case: timings on a
busy machine are provisional.

For the default model at its 20 steps it also answers "does tune beat the README's hand
sweep at equal quality?": the hand-chosen values (models/default/hybridiff.json: L 8,
eps 4e-3, k 5, tau_cap 15) are a point of the default grid, so the same report holds their
quality and predicted latency; the script prints the fastest candidate whose mean PSNR is at
least theirs (same runs, same latency model) and its speedup against theirs.

    cargo build --release -p hybridiff-cli
    python3 tools/tune_cases.py [--bin target/release/hybridiff] [--work /tmp/tune-cases] \
        [--only default-20,sdxl-fifth-20] [--markdown docs/benchmarks/tune-results.md]
"""

import argparse
import json
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAND = dict(l_slope=8, eps_slope=4e-3, k=5, tau_cap=15)


def loadavg():
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def sh(cmd, **kw):
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/hybridiff"))
    ap.add_argument("--work", default="/tmp/hybridiff-tune-cases")
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown")
    ap.add_argument("--threads-per-rank", default="1")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    models = {
        "sdxl-fifth": ("configs/sdxl-fifth-unet.json", ["--latent-size", "32"]),
        "sd3-small": ("configs/sd3-small-transformer.json", ["--latent-size", "32"]),
    }
    cases = []
    for steps in (20, 50):
        # The default model: its README prompts at seeds 1 and 2 (as the hand sweep), the
        # floor on the average (as the sweep ranked), 39 dB (the sweep's best mean).
        cases.append((f"default-{steps}", None, steps,
                      ["--seed", "1", "--seeds", "2", "--holdout-seeds", "1", "--floor-on", "average",
                       "--min-psnr", "39"]))
        for name, (cfg, extra) in models.items():
            cases.append((f"{name}-{steps}", name, steps,
                          ["--seeds", "1", "--holdout-seeds", "1", "--min-psnr", "30", "--pipelined-guidance", "none", *extra]))
    only = [c for c in a.only.split(",") if c]
    rows = []
    for case, model, steps, extra in cases:
        if only and case not in only:
            continue
        cmd = [a.bin, "tune", "--steps", str(steps), "--world-size", "2",
               "--threads-per-rank", a.threads_per_rank, *extra]
        if model:
            folder = os.path.join(a.work, model)
            if not os.path.isdir(folder):
                sh([a.bin, "init", "--config", os.path.join(ROOT, models[model][0]), "--out", folder])
            cmd += ["--model", folder]
        out = os.path.join(a.work, f"{case}.json")
        report = os.path.join(a.work, f"{case}-report")
        for p in (out,):
            if os.path.exists(p):
                os.remove(p)
        if os.path.isdir(report):
            subprocess.run(["rm", "-rf", report], check=True)
        cmd += ["--out", out, "--report", report]
        before = loadavg()
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t
        print(p.stdout, p.stderr, flush=True)
        after = loadavg()
        j = json.load(open(os.path.join(report, "tune.json")))
        row = dict(case=case, ok=p.returncode == 0, seconds=secs, load=f"{before} -> {after}",
                   grid_runs=j["grid_runs"], runs=j["runs_made"], mismatched=j["schedules_mismatched"],
                   command=" ".join(cmd))
        if j["chosen"] is not None:
            c = j["candidates"][j["chosen"]]
            row.update(choice=f"L {c['l_slope']} eps {c['eps_slope']:g} k {c['k']} tau_cap {c['tau_cap']} "
                              f"{c['knobs']['pipelined_guidance']}",
                       worst=c["worst"], mean=c["mean"], speedup=c["speedup"])
            v = j.get("validation")
            if v:
                row.update(v_worst=v["worst"], v_mean=v["mean"], v_speedup=v["speedup"])
        if case == "default-20":
            hand = [c for c in j["candidates"] if all(c[k] == HAND[k] if k != "eps_slope"
                                                      else abs(c[k] - HAND[k]) < 1e-12 for k in HAND)
                    and c["knobs"]["pipelined_guidance"] == "none"]
            if hand:
                h = hand[0]
                better = [c for c in j["candidates"] if c["mean"] >= h["mean"]]
                best = min(better, key=lambda c: c["predicted_seconds"])
                row["hand"] = (f"hand values: mean {h['mean']:.2f} dB, worst {h['worst']:.2f}, {h['speedup']:.2f}x; "
                               f"fastest at >= their mean: L {best['l_slope']} eps {best['eps_slope']:g} k {best['k']} "
                               f"tau_cap {best['tau_cap']} {best['knobs']['pipelined_guidance']}: mean {best['mean']:.2f} dB, "
                               f"{best['speedup']:.2f}x ({best['speedup'] / h['speedup']:.2f}x the hand values' speedup)")
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    lines = ["| case | tune time (s) | load avg before -> after | grid runs | runs made | choice | tuning worst / mean PSNR (dB) | predicted speedup | held-out worst / mean | held-out speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['seconds']:.0f} | {r['load']} | {r['grid_runs']} | {r['runs']} | {r.get('choice', 'none meets the floor')} | "
            f"{r.get('worst', float('nan')):.2f} / {r.get('mean', float('nan')):.2f} | {r.get('speedup', float('nan')):.2f}x | "
            f"{r.get('v_worst', float('nan')):.2f} / {r.get('v_mean', float('nan')):.2f} | {r.get('v_speedup', float('nan')):.2f}x |")
    text = "\n".join(lines) + "\n"
    for r in rows:
        if "hand" in r:
            text += f"\n{r['case']}: {r['hand']}\n"
    text += "\nCommands:\n\n" + "\n".join(f"    {r['command']}" for r in rows) + "\n"
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
