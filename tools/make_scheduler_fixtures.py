#!/usr/bin/env python3
"""Writes tests/fixtures/schedulers/: diffusers' schedules and sampling runs for the
samplers of issue 23 (Euler with Karras sigmas, Euler Ancestral, DPM-Solver++ 2M with
Karras / sigma_min / SDE, UniPC, LCM, flow-matching Euler with dynamic shifting and
Karras sigmas).

- schedules.json + schedules.safetensors: for every variant (scheduler class x config),
  the timesteps and sigmas diffusers' `set_timesteps(n)` gives for every n in 1..max_steps
  (100, or LCM's original_inference_steps), stored flat: `<name>.timesteps` is the
  concatenation over n of the n timesteps, `<name>.sigmas` of the n + 1 sigmas (empty when
  the class has none), `<name>.init_noise_sigma` one value per n.
- runs.json + runs.safetensors: 20-step (and a few shorter) sampling runs with the stand-in
  model output `0.5*sin(0.7*scale_model_input(x_i, t_i) + i)` from `init`, the stochastic
  samplers given `noise[i]` as step i's noise (DPM-Solver's `variance_noise`; Euler
  Ancestral's and LCM's `randn_tensor` replaced by a function that returns `noise[i]`),
  `<name>.step_latents[i]` the latents after step i.
- rescale.safetensors: diffusers' `rescale_noise_cfg` (the pipelines' `guidance_rescale`)
  of `cfg` toward `text` for phi 0.7 and 1.0 (`out_0.7`, `out_1.0`).

Run: /work/venv/bin/python tools/make_scheduler_fixtures.py (diffusers 0.42.1, torch, CPU,
float32; a few seconds). Deterministic: the same files every run.
"""

import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "schedulers")

CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "dpmpp-2m-sde": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}

# SD 1.x / SDXL's training schedule, as their scheduler_config.json files give it.
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD3 = dict(num_train_timesteps=1000, shift=3.0)


def calculate_shift(cfg, seq_len):
    """mu as diffusers' SD3 pipeline computes it (calculate_shift) from the config's keys."""
    base, mx = cfg["base_image_seq_len"], cfg["max_image_seq_len"]
    m = (cfg["max_shift"] - cfg["base_shift"]) / (mx - base)
    b = cfg["base_shift"] - m * base
    return seq_len * m + b


def make(kind, overrides):
    cfg = dict(SD3 if kind == "flow-euler" else SD)
    if kind == "dpmpp-2m-sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    cfg.update(overrides)
    return CLASSES[kind](**cfg)


def config_of(sched):
    """The config as its scheduler_config.json would hold it, with non-finite floats
    (DPM-Solver's lambda_min_clipped) as the strings "Infinity" / "-Infinity" so that
    the fixture is strict JSON (hybridiff reads both spellings)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in dict(sched.config).items() if k != "solver_p"}


def set_steps(sched, kind, n, seq_len):
    if seq_len is not None:
        sched.set_timesteps(n, mu=calculate_shift(sched.config, seq_len))
    else:
        sched.set_timesteps(n)


def schedule_variants():
    v = []
    for kind in ["euler", "dpmpp-2m", "unipc"]:
        for spacing in ["linspace", "leading", "trailing"]:
            for karras in [False, True]:
                name = f"{kind}-{spacing}" + ("-karras" if karras else "")
                v.append((name, kind, dict(timestep_spacing=spacing, use_karras_sigmas=karras), None))
        v.append((f"{kind}-linspace-karras-sigma-min", kind,
                  dict(timestep_spacing="linspace", use_karras_sigmas=True, final_sigmas_type="sigma_min"), None))
        v.append((f"{kind}-leading-sigma-min", kind,
                  dict(timestep_spacing="leading", final_sigmas_type="sigma_min"), None))
    # Euler reads sigma_min / sigma_max for its Karras ramp (DPM-Solver has no such keys).
    v.append(("euler-leading-karras-range", "euler",
              dict(timestep_spacing="leading", use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0), None))
    # Cosine schedule: DPM-Solver keeps Karras timesteps unrounded (then truncates to int64).
    v.append(("dpmpp-2m-cosine-karras", "dpmpp-2m",
              dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True), None))
    for spacing in ["linspace", "leading", "trailing"]:
        v.append((f"euler-a-{spacing}", "euler-a", dict(timestep_spacing=spacing), None))
    v.append(("lcm", "lcm", dict(), None))
    v.append(("lcm-orig-100", "lcm", dict(original_inference_steps=100), None))
    v.append(("flow-shift-3", "flow-euler", dict(), None))
    v.append(("flow-shift-1", "flow-euler", dict(shift=1.0), None))
    v.append(("flow-karras", "flow-euler", dict(use_karras_sigmas=True), None))
    v.append(("flow-dynamic-1024", "flow-euler", dict(use_dynamic_shifting=True), 1024))
    v.append(("flow-dynamic-4096-linear", "flow-euler",
              dict(use_dynamic_shifting=True, time_shift_type="linear"), 4096))
    return v


def write_schedules():
    tensors, meta = {}, []
    for name, kind, overrides, seq_len in schedule_variants():
        sched = make(kind, overrides)
        max_steps = sched.config.original_inference_steps if kind == "lcm" else 100
        ts, sg, ins, extra = [], [], [], []
        for n in range(1, max_steps + 1):
            set_steps(sched, kind, n, seq_len)
            t = sched.timesteps.to(torch.float64).numpy()
            s = sched.sigmas.to(torch.float64).numpy() if kind != "lcm" else None
            if len(t) == n + 1:
                # diffusers' trailing spacing strides np.arange by the float 1000 / n, which
                # for some n (61, 103, ...) yields one more timestep, -1: a step more than
                # asked. Stored: the n asked for and the final sigma (see the README).
                assert sched.config.timestep_spacing == "trailing" and t[-1] == -1, (name, n, t[-3:])
                extra.append(n)
                t = t[:n]
                s = np.concatenate([s[:n], s[-1:]])
            assert len(t) == n, (name, n, len(t))
            ts.append(t)
            if s is not None:
                assert len(s) == n + 1, (name, n, len(s))
                sg.append(s)
            ins.append(float(getattr(sched, "init_noise_sigma", 1.0)))
        tensors[f"{name}.timesteps"] = torch.from_numpy(np.concatenate(ts)).to(torch.float32)
        tensors[f"{name}.sigmas"] = torch.from_numpy(np.concatenate(sg) if sg else np.zeros(0)).to(torch.float32)
        tensors[f"{name}.init_noise_sigma"] = torch.tensor(ins, dtype=torch.float32)
        # float32 holds every value exactly: integer timesteps < 2^24, and diffusers keeps
        # the others (Euler's, flow's timesteps; all sigmas) in float32 already.
        assert np.array_equal(tensors[f"{name}.timesteps"].double().numpy(), np.concatenate(ts)), name
        meta.append(dict(name=name, kind=kind, config=config_of(sched), max_steps=max_steps, image_seq_len=seq_len,
                         diffusers_extra_step=extra))
    save_file(tensors, os.path.join(OUT, "schedules.safetensors"))
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump(dict(diffusers=diffusers.__version__, torch=torch.__version__, variants=meta), f, indent=1,
                  allow_nan=False)
        f.write("\n")


STEP_RULE = (
    "x_0 = init * init_noise_sigma; x_{i+1} = step(model_output=0.5*sin(0.7*scale_model_input(x_i, t_i) + i), "
    "t_i, x_i, noise[i]) for i < steps; noise[i] is step i's noise where the sampler draws any"
)


def run_variants():
    return [
        ("euler-leading-karras", "euler", dict(timestep_spacing="leading", use_karras_sigmas=True), 20, None),
        ("euler-trailing-karras-v", "euler",
         dict(timestep_spacing="trailing", use_karras_sigmas=True, prediction_type="v_prediction",
              final_sigmas_type="sigma_min"), 20, None),
        ("euler-a-leading", "euler-a", dict(timestep_spacing="leading"), 20, None),
        ("euler-a-trailing-v", "euler-a", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 20, None),
        ("dpmpp-2m-karras", "dpmpp-2m", dict(use_karras_sigmas=True), 20, None),
        ("dpmpp-2m-leading-sigma-min", "dpmpp-2m", dict(timestep_spacing="leading", final_sigmas_type="sigma_min"), 20,
         None),
        ("dpmpp-2m-karras-10", "dpmpp-2m", dict(use_karras_sigmas=True), 10, None),
        ("dpmpp-2m-sde", "dpmpp-2m-sde", dict(), 20, None),
        ("dpmpp-2m-sde-karras", "dpmpp-2m-sde", dict(use_karras_sigmas=True), 20, None),
        ("dpmpp-2m-sde-trailing-v-sigma-min", "dpmpp-2m-sde",
         dict(timestep_spacing="trailing", prediction_type="v_prediction", final_sigmas_type="sigma_min"), 20, None),
        ("unipc", "unipc", dict(), 20, None),
        ("unipc-karras", "unipc", dict(use_karras_sigmas=True), 20, None),
        ("unipc-leading-bh1-order3-v", "unipc",
         dict(timestep_spacing="leading", solver_type="bh1", solver_order=3, prediction_type="v_prediction",
              final_sigmas_type="sigma_min"), 20, None),
        # diffusers' last step is NaN here (B(h) = h is infinite at a zero final sigma and
        # multiplies a zero): the Rust test compares the steps before it.
        ("unipc-bh1-final-zero", "unipc", dict(solver_type="bh1"), 20, None),
        ("unipc-noise-prediction-disable-corrector", "unipc",
         dict(predict_x0=False, disable_corrector=[0, 5], final_sigmas_type="sigma_min"), 20, None),
        ("unipc-trailing-sigma-min-8", "unipc",
         dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), 8, None),
        ("lcm", "lcm", dict(), 20, None),
        ("lcm-4", "lcm", dict(), 4, None),
        ("lcm-8-v", "lcm", dict(prediction_type="v_prediction"), 8, None),
        ("flow-dynamic-1024", "flow-euler", dict(use_dynamic_shifting=True), 20, 1024),
        ("flow-karras", "flow-euler", dict(use_karras_sigmas=True), 20, None),
    ]


def write_runs():
    g = torch.Generator("cpu").manual_seed(23)
    shape = (1, 4, 8, 8)
    init = torch.randn(shape, generator=g, dtype=torch.float32)
    noise = torch.randn((20,) + shape, generator=g, dtype=torch.float32)
    tensors = {"init": init, "noise": noise}
    meta = []
    current = {"i": None}

    def given_noise(shape_, generator=None, device=None, dtype=None, layout=None):
        i = current["i"]
        assert tuple(shape_) == shape, shape_
        return noise[i].to(dtype or torch.float32)

    scheduling_euler_ancestral_discrete.randn_tensor = given_noise
    scheduling_lcm.randn_tensor = given_noise
    for name, kind, overrides, steps, seq_len in run_variants():
        sched = make(kind, overrides)
        set_steps(sched, kind, steps, seq_len)
        x = init * getattr(sched, "init_noise_sigma", 1.0)
        out = []
        for i, t in enumerate(sched.timesteps):
            current["i"] = i
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            model_output = 0.5 * torch.sin(0.7 * inp + i)
            kw = {"variance_noise": noise[i]} if kind == "dpmpp-2m-sde" else {}
            x = sched.step(model_output, t, x, **kw).prev_sample
            out.append(x.clone())
        assert len(out) == steps
        tensors[f"{name}.step_latents"] = torch.stack(out)
        meta.append(dict(name=name, kind=kind, config=config_of(sched), steps=steps, image_seq_len=seq_len))
    save_file(tensors, os.path.join(OUT, "runs.safetensors"))
    with open(os.path.join(OUT, "runs.json"), "w") as f:
        json.dump(dict(diffusers=diffusers.__version__, torch=torch.__version__, step_rule=STEP_RULE, runs=meta), f,
                  indent=1, allow_nan=False)
        f.write("\n")


def write_rescale():
    """diffusers' rescale_noise_cfg (guidance_rescale) on a batch of two: `cfg`, `text`,
    and `out_<phi>` for phi 0.7 and 1.0."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    g = torch.Generator("cpu").manual_seed(7)
    text = torch.randn((2, 4, 8, 8), generator=g)
    uncond = torch.randn((2, 4, 8, 8), generator=g) * 0.5
    cfg = uncond + 5.0 * (text - uncond)
    tensors = {"cfg": cfg, "text": text}
    for phi in [0.7, 1.0]:
        tensors[f"out_{phi}"] = rescale_noise_cfg(cfg, text, guidance_rescale=phi)
    save_file(tensors, os.path.join(OUT, "rescale.safetensors"))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    write_schedules()
    write_runs()
    write_rescale()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
