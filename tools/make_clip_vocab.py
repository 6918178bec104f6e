#!/usr/bin/env python3
"""Writes crates/hybridiff-text/data/clip_merges.txt.gz: the CLIP BPE merge list that the
binary carries for single-file checkpoints (which hold no tokenizer files).

Source: `open_clip/bpe_simple_vocab_16e6.txt.gz` of the `open_clip_torch` wheel on PyPI
(MIT licence; the vocabulary is OpenAI CLIP's, also MIT). CLIP's tokenizer uses the first
49152 - 256 - 2 = 48894 merges of that file; this keeps exactly those, under a standard
`#version: 0.2` first line, gzipped deterministically (no name, mtime 0). The vocabulary
itself follows from the merges (CLIP's `SimpleTokenizer`: the 256 byte symbols, the same
with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>`), which
crates/hybridiff-text rebuilds and tests against the vocab.json of the published
tokenizers (tests/fixtures/tiny-sdxl-pipeline/tokenizer).

Run from the repository root (downloads the wheel with pip, no other network use):
    /work/venv/bin/python tools/make_clip_vocab.py [--wheel open_clip_torch-*.whl]
"""

import argparse
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "hybridiff-text" / "data" / "clip_merges.txt.gz"
N_MERGES = 49152 - 256 - 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary=:all:", "open_clip_torch", "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            raw = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    lines = raw.decode("utf-8").split("\n")
    merges = lines[1:1 + N_MERGES]
    assert len(merges) == N_MERGES and all(len(m.split(" ")) == 2 for m in merges)
    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write(text.encode("utf-8"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(buf.getvalue())
    print(f"wrote {OUT.relative_to(ROOT)}: {N_MERGES} merges, {len(buf.getvalue())} bytes")


if __name__ == "__main__":
    main()
