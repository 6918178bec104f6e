"""Writes tests/fixtures/metrics/: a small fixed image pair and scikit-image's PSNR and
SSIM for it, the reference for `hybridiff compare`.

Run: /work/venv/bin/python tools/make_metric_fixtures.py  (needs numpy, pillow, scikit-image)
"""
import json
import pathlib

import numpy as np
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics"
(out / "a").mkdir(parents=True, exist_ok=True)
(out / "b").mkdir(parents=True, exist_ok=True)

rng = np.random.default_rng(2026)
h, w = 24, 32
yy, xx = np.mgrid[0:h, 0:w]
a = np.stack([(xx * 8) % 256, (yy * 10) % 256, ((xx + yy) * 5) % 256], axis=-1).astype(np.uint8)
noise = rng.normal(0, 12, size=a.shape)
b = np.clip(a.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)

Image.fromarray(a).save(out / "a" / "pair.png")
Image.fromarray(b).save(out / "b" / "pair.png")
Image.fromarray(a).save(out / "a" / "same.png")
Image.fromarray(a).save(out / "b" / "same.png")

expected = {
    "pair.png": {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=255)),
        "ssim": float(structural_similarity(a, b, channel_axis=-1, data_range=255)),
    },
    "same.png": {"psnr": None, "ssim": 1.0},
    "note": "scikit-image defaults: 7x7 uniform window, K1 0.01, K2 0.03, sample covariance, channel mean",
}
(out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print(json.dumps(expected, indent=1))
