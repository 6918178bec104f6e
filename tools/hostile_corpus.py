#!/usr/bin/env python3
"""Runs a corpus of hostile and mistaken inputs against the `hybridiff` binary.

Every case edits one thing of a known-good run (a config value, an inputs tensor, a
flag, an output target, a prompts file) and runs the binary with a time limit and an
address-space limit (so a runaway allocation aborts instead of swapping the machine).
A case is a FINDING when the binary panics, aborts, is killed, hangs, or exits 0 while
writing NaN latents or leaving the edited thing unnoticed where it must not be (an
output that replaced a device or FIFO). Everything else (a clean error, exit 1, or a
success on an input that is merely unusual) is listed with its first message line.

    python3 tools/hostile_corpus.py [--bin target/debug/hybridiff] [--only WORD] [--jobs 2]

Only the Python standard library is used: safetensors files are written by hand.
Prints one line per case and a summary; exits 1 when there are findings.
"""

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny-sdxl"
PIPE = FIX / "tiny-sdxl-pipeline"
SD3 = FIX / "tiny-sd3"

# Values tried for every number in a config file.
NUMBERS = [0, -1, 1e12, 2**64, 1e308, "NaN", "Infinity", -1e-30, 0.5, None, "x", [], {}, True]

# --------------------------------------------------------------------------- safetensors

DTYPES = {"F64": ("d", 8), "F32": ("f", 4), "I64": ("q", 8), "I32": ("i", 4), "U8": ("B", 1)}


def read_safetensors(path):
    """{name: (dtype, shape, [values])} (F16 and BF16 widened to F32)."""
    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        raw = body[a:b]
        if dt in ("F16",):
            vals = list(struct.unpack(f"<{len(raw) // 2}e", raw))
            dt = "F32"
        elif dt == "BF16":
            vals = [struct.unpack("<f", b"\0\0" + raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
            dt = "F32"
        else:
            code, size = DTYPES[dt]
            vals = list(struct.unpack(f"<{len(raw) // size}{code}", raw))
        out[name] = (dt, shape, vals)
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dt, shape, vals) in tensors.items():
        code, size = DTYPES[dt]
        if dt.startswith("I"):
            vals = [int(v) for v in vals]
        if dt == "U8":
            vals = [min(max(int(v), 0), 255) for v in vals]
        blob = struct.pack(f"<{len(vals)}{code}", *vals)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# --------------------------------------------------------------------------- helpers


def linked_copy(src, dst):
    """Real folders, symbolic links to files: one file can be replaced cheaply."""
    dst.mkdir(parents=True, exist_ok=True)
    for e in Path(src).iterdir():
        real = e.resolve()
        if real.is_dir():
            linked_copy(real, dst / e.name)
        else:
            os.symlink(real, dst / e.name)


def replace_json(path, edit):
    text = Path(path).read_text()
    v = json.loads(text)
    edit(v)
    Path(path).unlink()
    # Python's json writes NaN and Infinity as bare tokens, as diffusers' configs do.
    Path(path).write_text(json.dumps(v).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity"))


def limit_memory():
    gib = 8 << 30
    resource.setrlimit(resource.RLIMIT_AS, (gib, gib))


class Case:
    """One run. `cwd`: run in the case's work folder (for outputs named `-`). `interrupt`:
    send SIGINT that many times (1 or 2) once `{w}/b/manifest.json` lists an image."""

    def __init__(self, name, args, setup=None, check=None, env=None, timeout=60, cwd=False, interrupt=0):
        self.name, self.args, self.setup, self.check = name, args, setup, check
        self.env, self.timeout, self.cwd, self.interrupt = env or {}, timeout, cwd, interrupt


def run_interrupted(cmd, case, env, work):
    """Runs `cmd`, sends SIGINT `case.interrupt` times after the first image is listed."""
    import signal
    import time
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                         env=env, preexec_fn=limit_memory, stdin=subprocess.DEVNULL)
    manifest = work / "b" / "manifest.json"
    start = time.time()
    while time.time() - start < case.timeout:
        try:
            if json.loads(manifest.read_text()):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    for _ in range(case.interrupt):
        p.send_signal(signal.SIGINT)
        time.sleep(0.02)
    out, err = p.communicate(timeout=case.timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_case(binary, case, scratch):
    work = Path(tempfile.mkdtemp(dir=scratch))
    ctx = {"w": work}
    try:
        if case.setup:
            case.setup(ctx)
        args = [str(a).format(**{k: str(v) for k, v in ctx.items()}) for a in case.args]
        env = dict(os.environ, HYBRIDIFF_CACHE=str(scratch / "cache"), **case.env)
        try:
            if case.interrupt:
                p = run_interrupted([binary, *args], case, env, work)
            else:
                p = subprocess.run(
                    [binary, *args], capture_output=True, text=True, errors="replace",
                    timeout=case.timeout, env=env, preexec_fn=limit_memory, stdin=subprocess.DEVNULL,
                    cwd=work if case.cwd else None,
                )
        except subprocess.TimeoutExpired:
            return case.name, "FINDING", f"hung (> {case.timeout} s)"
        err = p.stderr.strip().splitlines()
        first = next((l for l in err if "error" in l or "WARN" in l), err[-1] if err else "")
        if "panicked" in p.stderr:
            return case.name, "FINDING", "panic: " + first
        if p.returncode < 0 or p.returncode in (101, 134, 137) or (p.returncode == 130 and not case.interrupt):
            return case.name, "FINDING", f"exit {p.returncode}: {first}"
        if case.check:
            bad = case.check(ctx, p)
            if bad:
                return case.name, "FINDING", bad
        kind = "ok" if p.returncode == 0 else "refused"
        return case.name, kind, first[:300]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the corpus

DENOISE = ["denoise", "--model", "{w}/m", "--inputs", "{w}/in.safetensors", "--out", "{w}/o.st", "--steps", "2"]
GENERATE = ["generate", "--model", "{w}/m", "--prompt", "a red circle", "--steps", "2", "--out", "{w}/o.png"]


def with_model(src, edit=None, inputs=None):
    def setup(ctx):
        linked_copy(src, ctx["w"] / "m")
        if inputs is not None:
            t = read_safetensors(TINY / "inputs.safetensors")
            inputs(t)
            write_safetensors(ctx["w"] / "in.safetensors", t)
        else:
            os.symlink(TINY / "inputs.safetensors", ctx["w"] / "in.safetensors")
        if edit:
            edit(ctx["w"] / "m")
    return setup


def no_nan_output(ctx, p):
    out = ctx["w"] / "o.st"
    if p.returncode == 0 and out.exists():
        for name, (_, _, vals) in read_safetensors(out).items():
            if any(v != v or v in (float("inf"), float("-inf")) for v in vals):
                return f"exit 0 with non-finite `{name}`"
    return None


def config_cases():
    cases = []
    for src, rel, base in [
        (TINY, "unet/config.json", DENOISE),
        (TINY, "scheduler/scheduler_config.json", DENOISE),
        (TINY, "vae/config.json", DENOISE + ["--decode", "{w}/o.png"]),
        (PIPE, "text_encoder/config.json", GENERATE),
        (PIPE, "text_encoder_2/config.json", GENERATE),
        (PIPE, "tokenizer/tokenizer_config.json", GENERATE),
        (SD3, "transformer/config.json", ["denoise", "--model", "{w}/m", "--inputs", str(SD3 / "inputs.safetensors"), "--out", "{w}/o.st", "--steps", "2"]),
    ]:
        cfg = json.loads((src / rel).read_text())
        for key, value in cfg.items():
            if key.startswith("_") or isinstance(value, str):
                continue
            for bad in NUMBERS:
                if bad == value:
                    continue

                def edit(m, key=key, bad=bad, rel=rel):
                    replace_json(m / rel, lambda v: v.__setitem__(key, bad))

                args = list(base)
                cases.append(Case(f"{rel}:{key}={json.dumps(bad)}", args, with_model(src, edit), no_nan_output))
        # Missing file, empty file, not JSON, a JSON list, a FIFO.
        for what, writer in [
            ("missing", lambda p: None),
            ("empty", lambda p: p.write_text("")),
            ("garbage", lambda p: p.write_bytes(b"\xff\xfe{{{")),
            ("list", lambda p: p.write_text("[1, 2]")),
            ("fifo", lambda p: os.mkfifo(p)),
            ("folder", lambda p: p.mkdir()),
        ]:
            def edit(m, rel=rel, writer=writer):
                (m / rel).unlink()
                writer(m / rel)
            cases.append(Case(f"{rel}:{what}", list(base), with_model(src, edit), timeout=30))
    return cases


def tensor_cases():
    cases = []
    names = ["latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    for name in names:
        def as_dtype(t, name=name, dt="I64"):
            d, s, v = t[name]
            t[name] = (dt, s, [int(max(min(x, 1e9), -1e9)) for x in v] if dt != "F64" else v)
        for dt in ["I64", "I32", "U8", "F64"]:
            cases.append(Case(f"inputs:{name}:dtype={dt}", DENOISE, with_model(TINY, inputs=lambda t, name=name, dt=dt: as_dtype(t, name, dt)), no_nan_output))
        for label, val in [("nan", float("nan")), ("inf", float("inf")), ("3e38", 3e38), ("1e7", 1e7), ("-1e7", -1e7)]:
            def poke(t, name=name, val=val):
                d, s, v = t[name]
                v = list(v)
                v[len(v) // 2] = val
                t[name] = (d, s, v)
            cases.append(Case(f"inputs:{name}:value={label}", DENOISE, with_model(TINY, inputs=poke), no_nan_output))
        for label, shape_fn in [
            ("empty-dim", lambda s: [s[0], 0] + s[2:]),
            ("extra-dim", lambda s: [1] + s),
            ("scalar", lambda s: []),
            ("batch-3", lambda s: [3] + s[1:]),
        ]:
            def reshape(t, name=name, shape_fn=shape_fn):
                d, s, v = t[name]
                ns = shape_fn(list(s))
                n = 1
                for x in ns:
                    n *= x
                t[name] = (d, ns, (v * (n // max(len(v), 1) + 1))[:n])
            cases.append(Case(f"inputs:{name}:shape={label}", DENOISE, with_model(TINY, inputs=reshape), no_nan_output))
        cases.append(Case(f"inputs:{name}:missing", DENOISE, with_model(TINY, inputs=lambda t, name=name: t.pop(name))))
    for hw in [(0, 16), (1, 1), (3, 16), (512, 512), (4096, 4096), (16, 100000)]:
        def big(t, hw=hw):
            n = 4 * hw[0] * hw[1]
            if n > 50_000_000:  # 4096x4096: written sparse below instead
                t["latents"] = ("F32", [1, 4, hw[0], hw[1]], [0.0] * min(n, 4))
                return
            t["latents"] = ("F32", [1, 4, hw[0], hw[1]], [0.1] * n)
        cases.append(Case(f"inputs:latents:{hw[0]}x{hw[1]}", DENOISE, with_model(TINY, inputs=big), no_nan_output))
    # A safetensors header that claims far more data than the file holds.
    def lying_header(ctx):
        linked_copy(TINY, ctx["w"] / "m")
        h = json.dumps({"latents": {"dtype": "F32", "shape": [1, 4, 100000, 100000], "data_offsets": [0, 160000000000]}}).encode()
        (ctx["w"] / "in.safetensors").write_bytes(struct.pack("<Q", len(h)) + h)
    cases.append(Case("inputs:lying-header", DENOISE, lying_header))
    # A sparse file of 100 GB.
    def sparse(ctx):
        linked_copy(TINY, ctx["w"] / "m")
        with open(ctx["w"] / "in.safetensors", "wb") as f:
            f.truncate(100 << 30)
    cases.append(Case("inputs:sparse-100G", DENOISE, sparse))
    # Weights: NaN in one tensor, an int64 tensor, an extra and a missing tensor.
    for label, edit_w in [
        ("nan", lambda t: t.__setitem__("conv_in.weight", (t["conv_in.weight"][0], t["conv_in.weight"][1], [float("nan")] + t["conv_in.weight"][2][1:]))),
        ("int64", lambda t: t.__setitem__("conv_in.bias", ("I64", t["conv_in.bias"][1], [0] * len(t["conv_in.bias"][2])))),
        ("huge-f16-overflow", lambda t: t.__setitem__("conv_in.bias", ("F32", t["conv_in.bias"][1], [1e6] * len(t["conv_in.bias"][2])))),
        ("extra", lambda t: t.__setitem__("down_blocks.9.x.weight", ("F32", [2], [0.0, 0.0]))),
        ("missing", lambda t: t.pop("conv_out.weight")),
        ("wrong-shape", lambda t: t.__setitem__("conv_in.bias", ("F32", [3], [0.0] * 3))),
    ]:
        def edit(m, edit_w=edit_w):
            p = m / "unet" / "diffusion_pytorch_model.safetensors"
            t = read_safetensors(p)
            edit_w(t)
            p.unlink()
            write_safetensors(p, t)
        extra = ["--dtype", "f16"] if "f16" in label else []
        cases.append(Case(f"weights:unet:{label}", DENOISE + extra, with_model(TINY, edit), no_nan_output))
    return cases


def flag_cases():
    cases = []
    base = with_model(TINY)
    numeric = {
        "--steps": ["0", "-1", "100000", "1e3", "x"],
        "--guidance": ["-5", "NaN", "inf", "1e308", "0"],
        "--world-size": ["0", "3", "10000", "-1"],
        "--threads-per-rank": ["0", "10000", "18446744073709551615"],
        "--comm-timeout": ["0", "18446744073709551615", "-1"],
        "--warmup": ["18446744073709551615"],
        "--eps-slope": ["-1", "NaN"],
        "--l-slope": ["0", "100000"],
        "--k": ["0", "100000"],
        "--tau-cap": ["0", "100000"],
        "--dtype": ["bf16", "f8", ""],
        "--scheduler": ["lms", ""],
        "--strategy": ["distrifusion", ""],
        "--stages": ["x", ""],
    }
    for flag, values in numeric.items():
        for v in values:
            extra = [flag, v]
            if flag in ("--warmup",):
                extra += ["--strategy", "async"]
            if flag in ("--l-slope", "--k", "--tau-cap", "--eps-slope", "--stages"):
                extra += ["--strategy", "hybrid"]
            args = DENOISE[:-2] if flag == "--steps" else DENOISE
            cases.append(Case(f"denoise {flag} {v!r}", args + extra, base, no_nan_output))
    gen_base = with_model(PIPE)
    for flag, values in {
        "--height": ["0", "7", "100", "100000", "18446744073709551615"],
        "--width": ["0", "100000"],
        "--seed": ["18446744073709551615", "-1"],
        "--negative-prompt": ["-x"],
    }.items():
        for v in values:
            cases.append(Case(f"generate {flag} {v!r}", GENERATE + [flag, v], gen_base))
    for flag, v in [("--latent-size", "0"), ("--latent-size", "3"), ("--latent-size", "100000"), ("--context-len", "0"), ("--context-len", "10000000"), ("--repeats", "18446744073709551615"), ("--strategies", "serial,,cfg")]:
        cases.append(Case(f"bench {flag} {v!r}", ["bench", "--model", "{w}/m", flag, v, "--steps", "1", "--repeats", "1"] if flag != "--repeats" else ["bench", "--model", "{w}/m", flag, v, "--steps", "1"], base, timeout=60))
    return cases


def output_cases():
    cases = []

    def targets(ctx):
        with_model(TINY)(ctx)
        w = ctx["w"]
        os.mkfifo(w / "fifo")
        os.symlink("/dev/null", w / "null")
        (w / "dir").mkdir()
        os.symlink(w / "nowhere" / "x", w / "dangling")
    for flag in ["--out", "--trace", "--decode"]:
        for target in ["fifo", "null", "dir", "dangling"]:
            args = list(DENOISE)
            if flag == "--out":
                args[args.index("--out") + 1] = "{w}/" + target
            else:
                args += [flag, "{w}/" + target]

            def check(ctx, p, target=target):
                w = ctx["w"]
                if target == "null" and not os.path.islink(w / "null"):
                    return "the /dev/null link was replaced"
                if target == "fifo" and not (w / "fifo").is_fifo():
                    return "the FIFO was replaced"
                return None
            cases.append(Case(f"denoise {flag} -> {target}", args, targets, check, timeout=30))
    for a, b in [("--out", "--decode"), ("--out", "--trace"), ("--trace", "--decode")]:
        args = list(DENOISE)
        args[args.index("--out") + 1] = "{w}/same"
        args += [x for f in (a, b) if f != "--out" for x in (f, "{w}/same")]
        if "--out" not in (a, b):
            args[args.index("--out") + 1] = "{w}/o.st"
        cases.append(Case(f"denoise {a} == {b}", args, with_model(TINY)))
    cases.append(Case("denoise --out == --inputs", ["denoise", "--model", "{w}/m", "--inputs", "{w}/in.safetensors", "--out", "{w}/in.safetensors", "--steps", "2"], with_model(TINY, inputs=lambda t: None)))

    def existing_model(ctx):
        linked_copy(TINY, ctx["w"] / "m")
    cases.append(Case("init --out existing model", ["init", "--config", str(TINY / "unet/config.json"), "--out", "{w}/m"], existing_model))
    cases.append(Case("init --out a file", ["init", "--config", str(TINY / "unet/config.json"), "--out", str(TINY / "unet/config.json")], None))
    return cases


def prompts_cases():
    cases = []
    for label, name, content in [
        ("json-object", "p.json", '{"prompt": "x"}'),
        ("json-broken", "p.json", '[{"prompt": "x"'),
        ("json-numbers", "p.json", "[1, 2]"),
        ("json-empty-list", "p.json", "[]"),
        ("json-seed-negative", "p.json", '[{"prompt": "x", "seed": -1}]'),
        ("json-unknown-key", "p.json", '[{"prompt": "x", "negative": "y"}]'),
        ("text-bracket", "p.txt", "[draft] a red circle\n"),
        ("text-bom-crlf", "p.txt", "\ufeffa red circle\r\n"),
        ("text-empty", "p.txt", "\n\n  \n"),
        ("binary", "p.txt", "\x00\x01\xff"),
        ("jsonl", "p.jsonl", '{"prompt": "x"}\n{"prompt": 3}\n'),
    ]:
        def setup(ctx, name=name, content=content):
            with_model(PIPE)(ctx)
            (ctx["w"] / name).write_text(content, errors="surrogateescape") if "\xff" not in content else (ctx["w"] / name).write_bytes(b"\x00\x01\xff")
        cases.append(Case(f"--prompts {label}", ["generate", "--model", "{w}/m", "--prompts", "{w}/" + name, "--steps", "1", "--out", "{w}/batch"], setup))

    def fifo_prompts(ctx):
        with_model(PIPE)(ctx)
        os.mkfifo(ctx["w"] / "p.txt")
    cases.append(Case("--prompts fifo", ["generate", "--model", "{w}/m", "--prompts", "{w}/p.txt", "--out", "{w}/batch"], fifo_prompts, timeout=20))
    return cases


def pipeline_cases():
    """model_index.json, tokenizer files, --latents and hybridiff.json of a pipeline."""
    cases = []
    for label, edit in [
        ("index-unet-class", lambda v: v.__setitem__("unet", ["diffusers", "SomethingElse"])),
        ("index-no-text-encoder", lambda v: v.pop("text_encoder")),
        ("index-class", lambda v: v.__setitem__("_class_name", "KandinskyPipeline")),
        ("index-null-tokenizer", lambda v: v.__setitem__("tokenizer", [None, None])),
        ("index-number", lambda v: v.__setitem__("tokenizer", 3)),
    ]:
        def setup(ctx, edit=edit):
            with_model(PIPE)(ctx)
            replace_json(ctx["w"] / "m" / "model_index.json", edit)
        cases.append(Case(f"pipeline {label}", GENERATE, setup))
    for rel, content in [
        ("tokenizer/vocab.json", "{}"),
        ("tokenizer/vocab.json", "[]"),
        ("tokenizer/vocab.json", ""),
        ("tokenizer/merges.txt", "garbage\n\u0000"),
        ("tokenizer/merges.txt", ""),
        ("tokenizer/special_tokens_map.json", '{"eos_token": 5}'),
        ("hybridiff.json", '{"steps": 0}'),
        ("hybridiff.json", '{"steps": 100000000}'),
        ("hybridiff.json", '{"guidance": "x"}'),
        ("hybridiff.json", '{"stepz": 3}'),
    ]:
        def setup(ctx, rel=rel, content=content):
            with_model(PIPE)(ctx)
            p = ctx["w"] / "m" / rel
            if p.exists() or p.is_symlink():
                p.unlink()
            p.write_text(content)
        args = [a for a in GENERATE]
        if rel == "hybridiff.json":
            args = [a for a in GENERATE if a not in ("--steps", "2")]
        cases.append(Case(f"pipeline {rel} {content[:20]!r}", args, setup))
    for label, tensors in [
        ("int64", {"latents": ("I64", [1, 4, 16, 16], [0] * 1024)}),
        ("nan", {"latents": ("F32", [1, 4, 16, 16], [float("nan")] * 1024)}),
        ("shape", {"latents": ("F32", [1, 4, 8, 8], [0.0] * 256)}),
        ("missing", {"other": ("F32", [1], [0.0])}),
    ]:
        def setup(ctx, tensors=tensors):
            with_model(PIPE)(ctx)
            write_safetensors(ctx["w"] / "l.safetensors", tensors)
        cases.append(Case(f"generate --latents {label}", GENERATE + ["--latents", "{w}/l.safetensors"], setup))

    def latents_fifo(ctx):
        with_model(PIPE)(ctx)
        os.mkfifo(ctx["w"] / "l.safetensors")
    cases.append(Case("generate --latents fifo", GENERATE + ["--latents", "{w}/l.safetensors"], latents_fifo, timeout=20))
    return cases


def compare_cases():
    cases = []
    png_1x1 = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )

    def small(ctx):
        for d in "ab":
            (ctx["w"] / d).mkdir()
            (ctx["w"] / d / "x.png").write_bytes(png_1x1)
        (ctx["w"] / "a" / "only.png").write_bytes(png_1x1)
    cases.append(Case("compare 1x1 images", ["compare", "{w}/a", "{w}/b"], small))

    def fifo_png(ctx):
        for d in "ab":
            (ctx["w"] / d).mkdir()
            os.mkfifo(ctx["w"] / d / "x.png")
    cases.append(Case("compare fifo png", ["compare", "{w}/a", "{w}/b"], fifo_png, timeout=20))
    cases.append(Case("compare file not folder", ["compare", str(TINY / "unet/config.json"), str(TINY)], None))
    return cases


# --------------------------------------------------------------------------- issue 28


def tiny_trace(strategy, world, compute=0.01):
    """A trace as `bench --trace-dir` writes it, 2 steps, `world` ranks."""
    step = lambda i: {
        "index": i, "timestep": 999.0 - 500 * i, "mode": "exact", "rel_mae": 0.1, "wall_seconds": compute,
        "rank_compute_seconds": [compute] * world, "bytes_sent": 100 * (world - 1),
        "rank_bytes_sent": [100] * (world - 1) + [0] if world > 1 else [0],
        "rank_messages_sent": [1] * (world - 1) + [0] if world > 1 else [0],
        "rank_overlapped_bytes": [0] * world, "rank_overlapped_messages": [0] * world,
        "reference_bytes_sent": 100 * (world - 1), "tau1": None, "tau2": None,
    }
    return {
        "strategy": strategy, "world_size": world, "threads_per_rank": 1, "rank_devices": ["cpu"] * world,
        "transfer": "host" if world > 1 else "", "scheduler": "ddim", "num_steps": 2, "guidance": 5.0,
        "classifier_free_guidance": True, "total_seconds": 2 * compute + 0.001, "bytes_sent": 200 * (world - 1),
        "reference_bytes_sent": 200 * (world - 1), "stage_plan": None, "tau1": None, "tau2": None,
        "rel_mae_log": [0.1, 0.1], "steps": [step(0), step(1)],
    }


def exit0_is_finding(what):
    def check(ctx, p):
        return f"exit 0: {what}" if p.returncode == 0 else None
    return check


def trace_cases():
    """`bench --from-trace` on traces with one impossible field each: exit 0 is a finding."""
    cases = []
    edits = [
        ("negative compute", lambda t: t["cfg"]["steps"][0]["rank_compute_seconds"].__setitem__(0, -1.0)),
        ("huge compute", lambda t: t["cfg"]["steps"][0]["rank_compute_seconds"].__setitem__(1, 1e300)),
        ("zero total", lambda t: t["serial"].__setitem__("total_seconds", 0)),
        ("negative total", lambda t: t["cfg"].__setitem__("total_seconds", -5)),
        ("NaN total", lambda t: t["cfg"].__setitem__("total_seconds", float("nan"))),
        ("inf total", lambda t: t["cfg"].__setitem__("total_seconds", float("inf"))),
        ("world 0", lambda t: t["cfg"].__setitem__("world_size", 0)),
        ("world 3, lists of 2", lambda t: t["cfg"].__setitem__("world_size", 3)),
        ("serial world 2", lambda t: t["serial"].__setitem__("world_size", 2)),
        ("strategy with a pipe", lambda t: t["cfg"].__setitem__("strategy", "cfg | <script>")),
        ("unknown strategy", lambda t: t["cfg"].__setitem__("strategy", "warp")),
        ("device markup", lambda t: t["cfg"]["rank_devices"].__setitem__(1, "cpu|**x**")),
        ("transfer newline", lambda t: t["cfg"].__setitem__("transfer", "host\n| a |")),
        ("bytes do not add up", lambda t: t["cfg"].__setitem__("bytes_sent", 1)),
        ("steps short", lambda t: t["cfg"].__setitem__("num_steps", 7)),
        ("other guidance", lambda t: t["cfg"].__setitem__("guidance", 9.0)),
        ("overlapped > sent", lambda t: t["cfg"]["steps"][0]["rank_overlapped_bytes"].__setitem__(0, 10**6)),
        ("no serial", lambda t: t.pop("serial")),
        ("two serial", lambda t: t.__setitem__("serial2", dict(t["serial"]))),
        ("name with a pipe", lambda t: t.__setitem__("a|b", t.pop("cfg"))),
    ]
    for label, edit in edits:
        def setup(ctx, edit=edit):
            traces = {"serial": tiny_trace("serial", 1), "cfg": tiny_trace("cfg", 2)}
            edit(traces)
            d = ctx["w"] / "tr"
            d.mkdir()
            for name, t in traces.items():
                (d / f"{name}.json").write_text(json.dumps(t).replace("NaN", "NaN").replace("Infinity", "Infinity"))
        cases.append(Case(f"from-trace {label}", ["bench", "--from-trace", "{w}/tr", "--simulate-link", "pcie4"], setup,
                          exit0_is_finding("a table from an impossible trace")))
    return cases


def outputs_cases():
    """Outputs that overwrite each other or an input, wrong image names, `-`, folders."""
    cases = []
    bench = ["bench", "--model", "{w}/m", "--steps", "1", "--repeats", "0", "--strategies", "serial,cfg"]
    for flag, target in [("--json", "bt/cfg.json"), ("--markdown", "bt/serial.json"), ("--json", "bt/CFG.json"),
                         ("--markdown", "bt/./serial.json"), ("--json", "bt/../bt/cfg.json")]:
        def check(ctx, p, target=target):
            if p.returncode == 0:
                return f"exit 0 with {target} written twice"
            return None
        cases.append(Case(f"bench --trace-dir bt {flag} {target}", bench + ["--trace-dir", "{w}/bt", flag, "{w}/" + target],
                          with_model(TINY), check))
    for flag, name in [("--decode", "x.jpg"), ("--decode", "x"), ("--out", "x.png"), ("--trace", "t.webp")]:
        args = list(DENOISE)
        if flag == "--out":
            args[args.index("--out") + 1] = "{w}/" + name
        else:
            args += [flag, "{w}/" + name]
        cases.append(Case(f"denoise {flag} {name}", args, with_model(TINY), exit0_is_finding(f"{name} holds another format")))
    cases.append(Case("generate --out x.jpg", GENERATE[:-1] + ["{w}/x.jpg"], with_model(PIPE), exit0_is_finding("PNG bytes in x.jpg")))

    def no_dash_file(ctx, p):
        return "wrote a file named -" if (ctx["w"] / "-").exists() else None
    for args in [GENERATE[:-1] + ["-"], DENOISE[:-3] + ["-", "--steps", "2"], DENOISE + ["--trace", "-"],
                 ["bench", "--model", "{w}/m", "--json", "-"], ["bench", "--model", "{w}/m", "--trace-dir", "-"],
                 ["init", "--config", str(TINY / "unet/config.json"), "--out", "-"]]:
        src = PIPE if args[0] == "generate" else TINY
        cases.append(Case(f"{args[0]} {' '.join(a for a in args if a.startswith('-') and a != '-')} -", args, with_model(src),
                          no_dash_file, cwd=True))

    # Output folders: a batch into a folder another run wrote, with and without --force.
    def old_batch(ctx):
        with_model(PIPE)(ctx)
        b = ctx["w"] / "b"
        b.mkdir()
        for n in ["0000.png", "0001.png", "0002.png", "manifest.json"]:
            (b / n).write_text("old run")
        (b / "notes.txt").write_text("mine")
        (ctx["w"] / "p.txt").write_text("a\n")

    def kept(ctx, p):
        b = ctx["w"] / "b"
        if not (b / "notes.txt").exists():
            return "deleted a file it does not write"
        if p.returncode == 0 and (b / "0002.png").exists():
            return "the folder mixes two runs"
        return None
    batch = ["generate", "--model", "{w}/m", "--prompts", "{w}/p.txt", "--steps", "1", "--out", "{w}/b"]
    cases.append(Case("batch into another run's folder", batch, old_batch, kept))
    cases.append(Case("batch --force into a folder with a foreign file", batch + ["--force"], old_batch, kept))

    def stale_traces(ctx):
        with_model(TINY)(ctx)
        (ctx["w"] / "bt").mkdir()
        (ctx["w"] / "bt" / "async.json").write_text("{}")

    def no_stale(ctx, p):
        if p.returncode == 0 and (ctx["w"] / "bt" / "async.json").exists():
            return "an old run's trace left among the new ones"
        return None
    cases.append(Case("bench --trace-dir holding an old trace", bench + ["--trace-dir", "{w}/bt"], stale_traces, no_stale))
    cases.append(Case("bench --trace-dir --force holding an old trace", bench + ["--trace-dir", "{w}/bt", "--force"], stale_traces, no_stale))

    def init_mix(ctx):
        m = ctx["w"] / "m2"
        (m / "unet").mkdir(parents=True)
        (m / "unet" / "config.json").write_text("{}")
        (m / "model_index.json").write_text("{}")

    def no_unet(ctx, p):
        if p.returncode == 0 and (ctx["w"] / "m2" / "unet").exists():
            return "a unet/ of the old model next to the new transformer/"
        return None
    cases.append(Case("init --force U-Net folder with an MMDiT config",
                      ["init", "--config", str(SD3 / "transformer/config.json"), "--out", "{w}/m2", "--force"], init_mix, no_unet))
    return cases


def interrupt_cases():
    """Ctrl-C during a batch: the folder and its manifest must agree afterwards."""
    cases = []

    def setup(ctx):
        with_model(PIPE)(ctx)
        (ctx["w"] / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(30)))

    def agrees(ctx, p):
        b = ctx["w"] / "b"
        try:
            listed = sorted(e["file"] for e in json.loads((b / "manifest.json").read_text()) if "file" in e)
        except (OSError, ValueError) as e:
            return f"manifest unreadable after Ctrl-C: {e}"
        pngs = sorted(n.name for n in b.iterdir() if n.name.endswith(".png"))
        if pngs != listed:
            return f"folder {pngs} but manifest {listed}"
        if p.returncode != 130:
            return f"exit {p.returncode} after Ctrl-C (expected 130)"
        return None
    batch = ["generate", "--model", "{w}/m", "--prompts", "{w}/p.txt", "--steps", "40", "--out", "{w}/b"]
    cases.append(Case("batch Ctrl-C once", batch, setup, agrees, interrupt=1))
    cases.append(Case("batch Ctrl-C twice", batch, setup, agrees, interrupt=2))
    return cases


def scheduler_flag_cases():
    """Schedulers of the other training objective, flags a strategy ignores, step counts a
    schedule cannot run: exit 0 (or blaming the weights) is a finding."""
    cases = []
    for kind in ["flow-euler"]:
        cases.append(Case(f"denoise sdxl --scheduler {kind}", DENOISE + ["--scheduler", kind], with_model(TINY),
                          exit0_is_finding("a flow sampler on an epsilon model")))
    for kind in ["ddim", "euler", "dpmpp-2m"]:
        args = ["denoise", "--model", "{w}/m", "--inputs", str(SD3 / "inputs.safetensors"), "--out", "{w}/o.st", "--steps", "2",
                "--scheduler", kind]
        cases.append(Case(f"denoise sd3 --scheduler {kind}", args, with_model(SD3), exit0_is_finding("a diffusion sampler on a flow model")))
    for strategy, flag, value in [("cfg", "--stages", "auto"), ("serial", "--warmup", "2"), ("hybrid", "--warmup", "2"),
                                  ("cfg", "--patch-mode", "sync"), ("cfg", "--no-cfg-split", None), ("cfg", "--k", "3"),
                                  ("async", "--l-slope", "3"), ("patch", "--eps-slope", "0.1"), ("serial", "--tau-cap", "3"),
                                  ("async", "--pipelined-guidance", "reuse")]:
        extra = ["--strategy", strategy, flag] + ([value] if value else [])
        cases.append(Case(f"denoise --strategy {strategy} {flag}", DENOISE + extra, with_model(TINY),
                          exit0_is_finding(f"{flag} ignored by {strategy}")))
    for extra in [["--strategies", "serial,cfg", "--k", "3"], ["--strategies", "serial", "--world-size", "4"],
                  ["--repeats", "0", "--only-batch", "1"], ["--inputs", str(TINY / "inputs.safetensors"), "--latent-size", "8"]]:
        cases.append(Case(f"bench {' '.join(extra)}", ["bench", "--model", "{w}/m", "--steps", "1"] + extra, with_model(TINY),
                          exit0_is_finding("a flag the run ignores")))

    def not_the_weights(ctx, p):
        if p.returncode == 0:
            return no_nan_output(ctx, p)  # a schedule that runs (Euler at 1000 steps) is fine
        if "weights" in p.stderr:
            return "blames the weights for what --steps does"
        return None
    for kind, steps in [("dpmpp-2m", "999"), ("dpmpp-2m", "1000"), ("ddim", "1000"), ("euler", "1000")]:
        args = DENOISE[:-2] + ["--steps", steps, "--scheduler", kind]
        cases.append(Case(f"denoise --scheduler {kind} --steps {steps}", args, with_model(TINY), not_the_weights, timeout=120))
    return cases


def compare_more_cases():
    """compare: alpha-only and low-bit differences must not be `identical`; a header claiming
    12000x12000 pixels must be refused at once."""
    import zlib
    cases = []

    def png(path, w, h, rows, color_type, depth):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        raw = b"".join(b"\x00" + r for r in rows)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
                         + (chunk(b"IDAT", zlib.compress(raw)) if rows else b"") + chunk(b"IEND", b""))

    def pair(kind):
        def setup(ctx):
            for d in "ab":
                (ctx["w"] / d).mkdir()
            if kind == "alpha":
                for d, a in [("a", 255), ("b", 7)]:
                    png(ctx["w"] / d / "x.png", 8, 8, [bytes([10, 20, 30, a]) * 8] * 8, 6, 8)
            elif kind == "16bit":
                for d, lo in [("a", 0), ("b", 3)]:
                    png(ctx["w"] / d / "x.png", 8, 8, [struct.pack(">HHH", 4096 + lo, 100, 200) * 8] * 8, 2, 16)
            else:
                for d in "ab":
                    png(ctx["w"] / d / "x.png", 12000, 12000, [], 2, 8)
        return setup

    def not_identical(ctx, p):
        if p.returncode == 0 and json.loads(p.stdout).get("identical"):
            return "images that differ reported identical"
        return None
    cases.append(Case("compare alpha-only difference", ["compare", "{w}/a", "{w}/b", "--json"], pair("alpha"), not_identical))
    cases.append(Case("compare 16-bit low-bit difference", ["compare", "{w}/a", "{w}/b", "--json"], pair("16bit"), not_identical))
    cases.append(Case("compare 12000x12000 header", ["compare", "{w}/a", "{w}/b"], pair("big"), exit0_is_finding("huge image read"), timeout=15))
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "hybridiff"))
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument(
        "--groups",
        default="config,tensor,flag,output,prompts,pipeline,compare,trace,outputs,interrupt,scheduler,compare2",
        help="comma-separated case groups to run",
    )
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    groups = {
        "config": config_cases,
        "tensor": tensor_cases,
        "flag": flag_cases,
        "output": output_cases,
        "prompts": prompts_cases,
        "pipeline": pipeline_cases,
        "compare": compare_cases,
        "trace": trace_cases,
        "outputs": outputs_cases,
        "interrupt": interrupt_cases,
        "scheduler": scheduler_flag_cases,
        "compare2": compare_more_cases,
    }
    cases = [c for g in a.groups.split(",") for c in groups[g.strip()]()]
    if a.only:
        cases = [c for c in cases if a.only in c.name]
    scratch = Path(tempfile.mkdtemp(prefix="hybridiff-corpus-"))
    findings = 0
    counts = {}
    try:
        with ThreadPoolExecutor(a.jobs) as pool:
            for name, kind, msg in pool.map(lambda c: run_case(a.bin, c, scratch), cases):
                counts[kind] = counts.get(kind, 0) + 1
                findings += kind == "FINDING"
                print(f"{kind:8} {name}: {msg}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
