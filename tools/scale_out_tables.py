#!/usr/bin/env python3
"""The tables of docs/benchmarks/scale-out.md from the folder tools/bench_scale_out.sh wrote.

    python3 tools/scale_out_tables.py OUT [LATENT]

LATENT: the latent size bench_scale_out.sh ran the random-weight models at (default 32),
for the tables' titles.

Prints Markdown: the default model's images against serial (mean PSNR / SSIM per layout and
rank count), the random-weight models' final latents against serial (worst relative
difference, PSNR), the measured latency and the latency model's predictions (NVLink and
PCIe 4, from the compute measured here), and the SDXL-layout predictions (compute timed by
counted FLOPs, calibrated to a serial step time).
Standard library only.
"""

import json
import re
import sys
from pathlib import Path

LAYOUTS = [
    ("cfg", "cfg"),
    ("hybrid", "hybrid (across, sync)"),
    ("hybrid-perbranch", "hybrid (per-branch, sync)"),
    ("hybrid-displaced", "hybrid (across, displaced)"),
    ("patch", "patch (displaced)"),
    ("patch-sync", "patch (sync)"),
    ("async", "async stride 1"),
    ("async2", "async stride 2"),
]
WORLDS = [2, 4, 8]


def images(out: Path) -> str:
    s = ""
    for size in (64, 128):
        d = out / f"images-{size}"
        if not d.is_dir():
            continue
        s += f"\n#### {size}x{size} images ({size // 4}x{size // 4} latents), mean PSNR (dB) / SSIM of 5 images\n\n"
        s += "| layout | " + " | ".join(f"W = {w}" for w in WORLDS) + " |\n"
        s += "|---|" + "---|" * len(WORLDS) + "\n"
        for name, label in LAYOUTS:
            cells = []
            for w in WORLDS:
                f = d / f"{name}-w{w}.compare.json"
                if not f.is_file():
                    cells.append("-")
                    continue
                j = json.loads(f.read_text())
                n = len(j["images"])
                if j["identical"] == n:
                    cells.append("identical")
                else:
                    cells.append(f"{j['mean_psnr_db']:.1f} / {j['mean_ssim']:.4f}")
            s += f"| {label} | " + " | ".join(cells) + " |\n"
    return s


def bench_rows(out: Path, model: str):
    """(world, layout name, row) for every non-serial row of the model's bench runs."""
    rows = []
    for f in sorted(out.glob(f"{model}-w*-*.json")):
        m = re.match(rf"{re.escape(model)}-w(\d+)-(.+)\.json$", f.name)
        if not m:
            continue
        w, tag = int(m.group(1)), m.group(2)
        j = json.loads(f.read_text())
        for r in j["runs"]:
            if r["strategy"] == "serial":
                continue
            name = {
                "base": r["strategy"],
                "async1": "async",
            }.get(tag, tag)
            rows.append((w, name, r, j))
    return rows


def predicted(out: Path, model: str, w: int, tag: str, strategy: str, suffix: str):
    """Predicted speedup of `strategy` from traces/<model>-w<w>-<tag>/predicted-<suffix>.md."""
    f = out / "traces" / f"{model}-w{w}-{tag}" / f"predicted-{suffix}.md"
    if not f.is_file():
        return None
    for line in f.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 10 and cells[0] == strategy:
            return cells[10]
    return None


def latents(out: Path, model: str, title: str) -> str:
    rows = bench_rows(out, model)
    if not rows:
        return ""
    s = f"\n#### {title}\n\n"
    s += (
        "| layout | W | measured (s) | measured speedup | bytes / step | worst step's FLOPs spread | "
        "max rel diff | PSNR (dB) | predicted speedup, NVLink | predicted speedup, PCIe 4 |\n"
    )
    s += "|---|---|---|---|---|---|---|---|---|---|\n"
    order = {n: i for i, (n, _) in enumerate(LAYOUTS)}
    rows.sort(key=lambda x: (order.get(x[1], 99), x[0]))
    for w, name, r, j in rows:
        tag = {"cfg": "base", "hybrid": "base", "patch": "base", "async": "async1"}.get(name, name)
        label = dict(LAYOUTS).get(name, name)
        steps = j["steps"]
        psnr = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        preds = [
            predicted(out, model, w, tag, r["strategy"], sfx) or "-"
            for sfx in ("nvlink", "pcie4")
        ]
        s += (
            f"| {label} | {w} | {r['seconds']:.1f} | {r['speedup']:.2f}x | "
            f"{r['bytes_sent'] / steps / 1e6:.2f} MB | {100 * r['flops_spread']:.0f}% | "
            f"{r['max_rel_diff']:.2e} | {psnr} | " + " | ".join(preds) + " |\n"
        )
    return s


def layout1024(out: Path) -> str:
    d = out / "traces"
    if not d.is_dir() or not list(d.glob("sdxl-layout-*")):
        return ""
    s = "\n#### SDXL's layout at 1024x1024: predicted speedup over serial\n\n"
    s += "| layout | W | NVLink, 330 ms/step | NVLink, 100 ms/step | NVLink, 50 ms/step | PCIe 4, 330 ms/step | PCIe 4, 100 ms/step | PCIe 4, 50 ms/step | final latents' PSNR vs serial (dB) |\n"
    s += "|---|---|---|---|---|---|---|---|---|\n"
    for tdir in sorted(d.glob("sdxl-layout-w*")):
        m = re.match(r"sdxl-layout-w(\d+)-(.+)$", tdir.name)
        w, tag = int(m.group(1)), m.group(2)
        strategies = ["cfg", "hybrid", "patch", "async"] if tag == "base" else [tag.split("-")[0]]
        for strategy in strategies:
            name = {"base": "async2" if strategy == "async" else strategy}.get(tag, tag)
            cells = []
            for link in ("nvlink", "pcie4"):
                for ms in (330, 100, 50):
                    f = tdir / f"predicted-sdxl-{link}-{ms}ms.md"
                    v = "-"
                    if f.is_file():
                        for line in f.read_text().splitlines():
                            c = [x.strip() for x in line.strip("|").split("|")]
                            if len(c) > 10 and c[1] == strategy:
                                v = c[10]
                    cells.append(v)
            psnr = "-"
            bench = out / f"{tdir.name}.md"
            if bench.is_file():
                for line in bench.read_text().splitlines():
                    c = [x.strip() for x in line.strip("|").split("|")]
                    if len(c) > 11 and c[0] == strategy:
                        psnr = c[11]
            cells.append(psnr)
            s += f"| {dict(LAYOUTS).get(name, name)} | {w} | " + " | ".join(cells) + " |\n"
    return s


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: scale_out_tables.py OUT [LATENT]")
    out = Path(sys.argv[1])
    n = sys.argv[2] if len(sys.argv) > 2 else "32"
    print(images(out))
    print(latents(out, "sdxl5", f"1/5-width SDXL U-Net, {n}x{n} latents, 50 DDIM steps"))
    print(latents(out, "sd3s", f"small SD3 MMDiT, {n}x{n} latents, 50 flow-Euler steps"))
    print(layout1024(out))


if __name__ == "__main__":
    main()
