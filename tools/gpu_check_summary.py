#!/usr/bin/env python3
"""Assemble tools/gpu-check.sh's results (standard library only).

Reads from --work: bench-{unet,mmdit}.json (`hybridiff bench --json`),
diffusers-{unet,mmdit}.json (tools/bench_diffusers_forward.py), mem-*.txt
(nvidia-smi samples, MiB) and idle-mib.txt, traces/{unet,mmdit}/<strategy>.json;
from --out: parity-f32.json and parity-f16.json (`hybridiff parity --json`).
Writes to --out: forward.json (ours vs diffusers per model and batch: seconds,
ratio, peak memory), strategies.json (seconds, PSNR vs serial, bytes per
strategy), stages.json (per step and rank: compute seconds and bytes sent, mode)
and summary.md (the tables). Missing inputs become notes, not errors, so a failed
step still leaves the others' results.
"""

import argparse
import json
import os
import sys

MODELS = ("unet", "mmdit")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def peak_mib(work, name):
    try:
        with open(os.path.join(work, name)) as f:
            vals = [float(x) for x in f.read().split() if x.strip()]
    except (OSError, ValueError):
        return None
    return max(vals) if vals else None


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--have-diffusers", type=int, default=1)
    a = p.parse_args()
    notes = []
    idle = peak_mib(a.work, "idle-mib.txt")
    md = [f"# gpu-check on {a.device}", ""]

    # (a) parity
    md += ["## Fixture parity (`hybridiff parity`)", "", "| check | dtype | max abs diff | bound | pass |", "| --- | --- | --- | --- | --- |"]
    for dt in ("f32", "f16"):
        par = load(os.path.join(a.out, f"parity-{dt}.json"))
        if par is None:
            notes.append(f"parity-{dt}.json missing: the {dt} parity step failed (see gpu-check.log)")
            continue
        for r in par["rows"]:
            md.append(f"| {r['name']} | {r['dtype']} | {r['max_abs_diff']:.3e} | {r['bound']:.3e} | {r['pass']} |")
    md.append("")

    # (b) forwards
    forward = {}
    md += ["## Denoiser forward, f16 (median seconds)", "",
           "| model | batch | ours | diffusers | ours / diffusers | ours peak MiB | diffusers peak MiB (allocator) | diffusers peak MiB (nvidia-smi) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in MODELS:
        bench = load(os.path.join(a.work, f"bench-{m}.json"))
        diff = load(os.path.join(a.work, f"diffusers-{m}.json"))
        if bench is None:
            notes.append(f"bench-{m}.json missing: our bench of the {m} failed")
        if diff is None:
            notes.append(f"diffusers-{m}.json missing: " + ("the diffusers step failed" if a.have_diffusers else "diffusers not importable, skipped"))
        ours_peak = peak_mib(a.work, f"mem-ours-{m}.txt")
        diff_smi = peak_mib(a.work, f"mem-diffusers-{m}.txt")
        entry = {"latent_size": bench and bench.get("latent_size"), "rows": {}}
        for b in ("batch1", "batch2"):
            ours = ((bench or {}).get("forward_seconds") or {}).get(b)
            theirs = ((diff or {}).get("forward_seconds") or {}).get(b)
            alloc = ((diff or {}).get("peak_bytes") or {}).get(b)
            row = {
                "ours_seconds": ours,
                "diffusers_seconds": theirs,
                "ratio_ours_over_diffusers": (ours / theirs) if ours and theirs else None,
                # nvidia-smi: the whole device, CUDA context included, minus the idle reading.
                "ours_peak_mib": (ours_peak - idle) if ours_peak is not None and idle is not None else None,
                "diffusers_peak_mib_allocator": alloc / 2**20 if alloc else None,
                "diffusers_peak_mib_nvidia_smi": (diff_smi - idle) if diff_smi is not None and idle is not None else None,
            }
            entry["rows"][b] = row

            def f(v, fmt):
                return "-" if v is None else format(v, fmt)

            md.append(f"| {m} | {b[-1]} | {f(ours, '.4f')} | {f(theirs, '.4f')} | {f(row['ratio_ours_over_diffusers'], '.2f')} | "
                      f"{f(row['ours_peak_mib'], '.0f')} | {f(row['diffusers_peak_mib_allocator'], '.0f')} | {f(row['diffusers_peak_mib_nvidia_smi'], '.0f')} |")
        if diff:
            entry["diffusers_versions"] = {"torch": diff.get("torch"), "diffusers": diff.get("diffusers")}
        forward[m] = entry
    md += ["", "Ours peak: the device's memory in use during the whole bench (forwards and strategies), minus idle.", ""]

    # (c) strategies, (d) stages
    strategies, stages = {}, {}
    md += ["## Strategies, 2 ranks on one device (correctness)", "", "| model | strategy | ranks | seconds | PSNR vs serial (dB) | max abs diff | bytes sent | devices | transfer |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in MODELS:
        bench = load(os.path.join(a.work, f"bench-{m}.json"))
        runs = (bench or {}).get("runs") or []
        strategies[m] = runs
        for r in runs:
            if r["psnr_db"] is not None:
                psnr = f"{r['psnr_db']:.2f}"
            else:  # serial itself, or a run identical to it (infinite PSNR)
                psnr = "reference" if r["strategy"] == "serial" else "identical"
            md.append(f"| {m} | {r['strategy']} | {r['world_size']} | {r['seconds']:.3f} | {psnr} | {r['max_abs_diff']:.2e} | {r['bytes_sent']} | {' '.join(r.get('rank_devices') or [])} | {r.get('transfer', '')} |")
        stages[m] = {}
        tdir = os.path.join(a.work, "traces", m)
        for name in sorted(os.listdir(tdir)) if os.path.isdir(tdir) else []:
            t = load(os.path.join(tdir, name))
            if not t:
                continue
            stages[m][t["strategy"]] = {
                "world_size": t["world_size"],
                "rank_devices": t.get("rank_devices"),
                "stage_plan": t.get("stage_plan"),
                "steps": [
                    {
                        "index": s["index"],
                        "mode": s["mode"],
                        "wall_seconds": s["wall_seconds"],
                        "rank_compute_seconds": s["rank_compute_seconds"],
                        "bytes_sent": s["bytes_sent"],
                        "rank_bytes_sent": s["rank_bytes_sent"],
                    }
                    for s in t["steps"]
                ],
            }
    md += ["", "## Per step: mean compute seconds per rank and bytes sent", "", "| model | strategy | mode | steps | mean compute s per rank | mean bytes per step |", "| --- | --- | --- | --- | --- | --- |"]
    for m, by in stages.items():
        for s, t in by.items():
            modes = {}
            for st in t["steps"]:
                modes.setdefault(st["mode"], []).append(st)
            for mode, sts in modes.items():
                w = len(sts[0]["rank_compute_seconds"])
                per_rank = [sum(st["rank_compute_seconds"][i] for st in sts) / len(sts) for i in range(w)]
                mean_bytes = sum(st["bytes_sent"] for st in sts) / len(sts)
                md.append(f"| {m} | {s} | {mode} | {len(sts)} | {' / '.join(f'{x:.4f}' for x in per_rank)} | {mean_bytes:.0f} |")
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]

    def write(name, text):
        path = os.path.join(a.out, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)

    write("forward.json", json.dumps(forward, indent=2) + "\n")
    write("strategies.json", json.dumps(strategies, indent=2) + "\n")
    write("stages.json", json.dumps(stages, indent=2) + "\n")
    write("summary.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
