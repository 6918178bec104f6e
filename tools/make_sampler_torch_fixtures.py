#!/usr/bin/env python3
"""tests/fixtures/samplers-torch/: diffusers' images of the embedded default model with
`generator=torch.Generator("cpu").manual_seed(SEED)`, for the samplers that draw noise in
their steps (and two that do not), for `cli/tests/samplers.rs`: `generate --noise torch`
must give the same pictures (diffusers draws the starting latents and then each step's
noise from that one generator; `--noise torch` replays it).

    /work/venv/bin/python tools/make_sampler_torch_fixtures.py   (torch, diffusers, pillow)

Writes one 64x64 PNG per case and `expected.json` (prompt, seed, steps, guidance, and per
file the flags and diffusers' scheduler class and options).
"""

import json
import os

import diffusers
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "samplers-torch")

PROMPT = "a red circle on a white background"
SEED = 7
STEPS = 12
GUIDANCE = 5.0

# file, our flags, diffusers class, from_config options
CASES = [
    ("euler_a.png", ["--scheduler", "euler-a"], "EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m_sde_karras.png", ["--scheduler", "dpmpp-2m-sde", "--karras"], "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ("lcm.png", ["--scheduler", "lcm"], "LCMScheduler", {}),
    ("ddim.png", [], "DDIMScheduler", {}),
    ("unipc.png", ["--scheduler", "unipc"], "UniPCMultistepScheduler", {}),
]


def main():
    torch.set_num_threads(2)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        os.path.join(ROOT, "models", "default"), torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for name, flags, cls, opts in CASES:
        pipe.scheduler = getattr(diffusers, cls).from_config(base, **opts)
        g = torch.Generator("cpu").manual_seed(SEED)
        img = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g).images[0]
        img.save(os.path.join(OUT, name))
        cases.append(dict(file=name, flags=flags, diffusers_class=cls, options=opts))
        print(name)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(dict(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=GUIDANCE,
                       diffusers=diffusers.__version__, torch=torch.__version__, cases=cases), f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
