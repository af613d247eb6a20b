"""Diffusion family: one sampler step with classifier-free guidance.

Baselines are what a diffusers pipeline runs per step: ``noise_pred.chunk(2)``,
``uncond + g * (cond - uncond)``, then the diffusers scheduler's ``step()``;
eagerly, and through ``torch.compile`` of the same function. genfast runs the
twin scheduler's ``step_with_guidance`` (one kernel). Each call repeats the
same step (the step index is reset before every call, outside the timed
function's compiled region), the 10th of a 25-step schedule.

Bytes each step must move, for N latent elements of s bytes:

=====================  ===============================================  =====
sampler                traffic                                          bytes
=====================  ===============================================  =====
euler, ddim, flow      read uncond, cond, sample; write prev            4·N·s
dpmpp_2m               + read and write the previous x0 (history)       6·N·s
=====================  ===============================================  =====

Euler and DDIM also return x0 (pred_original_sample) as diffusers does: +N·s,
counted. Eager diffusers moves ~15-25 passes of fp32 temporaries.
"""
from __future__ import annotations

import torch

from harness import Case

FAMILY = "diffusion"
# (label, latent shape of one image); the model's output is a batch of 2x for guidance
SIZES = {
    "sd15-b1": (1, 4, 64, 64),
    "sd15-b8": (8, 4, 64, 64),
    "sdxl": (1, 4, 128, 128),
    "sd3": (1, 16, 128, 128),
    "video": (1, 16, 21, 60, 104),
}
# sampler -> (diffusers class, config, passes of N·s genfast moves)
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}, 5),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, 6),
    "ddim": ("DDIMScheduler", {}, 5),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 4),
}
GUIDANCE = 7.5
STEP = 10


def _build(sampler: str, shape, dtype, device):
    import diffusers

    import genfast.schedulers as gs

    name, config, _ = SAMPLERS[sampler]
    base = getattr(diffusers, name)(**config)
    twin = gs.from_diffusers(getattr(diffusers, name)(**config))
    for s in (base, twin):
        s.set_timesteps(25, device=device)
    t = base.timesteps[STEP]
    latents = torch.randn(shape, dtype=dtype, device=device)
    noise_pred = torch.randn((2 * shape[0], *shape[1:]), dtype=dtype, device=device)

    previous_x0 = torch.randn_like(latents)

    def place(s):
        # the state a step at STEP finds: its index, and for multistep one earlier output
        s._step_index = STEP
        s.is_scale_input_called = True  # the pipeline would have called scale_model_input (silences a warning)
        s._gf_counter = STEP  # the DDIM twin's step counter (diffusers' DDIM looks up by timestep)
        if hasattr(s, "lower_order_nums"):
            s.lower_order_nums = 1
            s.model_outputs = [None, previous_x0]

    def diffusers_step(noise_pred, latents):
        uncond, cond = noise_pred.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        return base.step(guided, t, latents).prev_sample

    compiled = torch.compile(diffusers_step, dynamic=False)

    def eager():
        place(base)
        return diffusers_step(noise_pred, latents)

    def comp():
        place(base)
        return compiled(noise_pred, latents)

    def fused():
        place(twin)
        uncond, cond = noise_pred.chunk(2)
        return twin.step_with_guidance(uncond, cond, t, latents, GUIDANCE).prev_sample

    return {"genfast": fused, "diffusers": eager, "torch.compile": comp}


def cases(quick: bool, device) -> list[Case]:
    """quick on the CPU: SD1.5 batch 1 and SDXL, fp32 (the GPU adds SD3 and video);
    full: every size in fp32 and fp16."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return []  # diffusers is the baseline: without it there is nothing to compare
    device = torch.device(device)
    if quick:
        sizes = ["sd15-b1", "sdxl"] + (["sd3", "video"] if device.type == "cuda" else [])
        dtypes = [torch.float32]
    else:
        sizes, dtypes = list(SIZES), [torch.float32, torch.float16]
    out = []
    for sampler, (_, _, passes) in SAMPLERS.items():
        for dtype in dtypes:
            for size in sizes:
                shape = SIZES[size]
                numel = torch.Size(shape).numel()
                out.append(Case(
                    family=FAMILY, op=sampler, mode="step+cfg", size=size, dtype=dtype, device=device,
                    nbytes=passes * numel * dtype.itemsize, footprint=passes * numel * dtype.itemsize,
                    impls=("genfast", "diffusers", "torch.compile"),
                    build=lambda sampler=sampler, shape=shape, dtype=dtype: _build(sampler, shape, dtype, device),
                ))
    return out
