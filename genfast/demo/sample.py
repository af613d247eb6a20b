"""``python -m genfast demo``: sample the four trained models with genfast, with its
plain-PyTorch reference and with eager PyTorch, check that they agree, time them.

Each model is sampled three ways from the same seed:

- genfast: genfast's default backend (C++ on the CPU, Triton on a GPU);
- reference: the same code under ``genfast.use_backend("reference")`` (every
  genfast op in genfast's pure-PyTorch reference; the GAN generator unpatched);
- eager: the same weights written the usual PyTorch way (``nn.GroupNorm`` then
  SiLU, the unpatched generator, diffusers' DDPM step arithmetic, SDPA over a
  plain K/V cache with ``torch.topk`` + ``torch.multinomial`` sampling).

What genfast runs per model:

- VAE: prior samples z = genfast.randn, decoded through GroupNorm+SiLU (``GroupNormAct``);
- GAN: the DCGAN generator after ``genfast.patch`` (BatchNorm folded into the
  transposed convs) against the unpatched ``nn.Sequential``;
- DDPM: the UNet's GroupNorm+SiLU (time embedding added inside) and one fused
  ``genfast.diffusion.sampler_step`` per DDPM step, its noise drawn in the kernel;
- GPT: ``genfast.KVCache`` (in-place append + ``attention_with_kvcache``) and
  ``genfast.sample_tokens`` (temperature, top-k) per decoded character.

genfast and the reference draw from genfast's counter-based noise stream (the
reference computes the same Philox numbers with integer tensor ops), and the
eager image loops take their noise from ``genfast.randn`` at the same stream
positions, so the samples must agree: images within ``IMAGE_ATOL``, texts
(genfast against the reference) character for character. The eager GPT draws
with torch's generator: it is timed, not compared.
"""
from __future__ import annotations

import copy
import math
import statistics
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

import genfast

from . import models

HERE = Path(__file__).resolve().parent
# Pixels are in [-1, 1]: 1e-3 is about an eighth of one 8-bit gray level. All paths compute in fp32;
# what differs is the order of the roundings (fused norms, BatchNorm folded in fp64).
IMAGE_ATOL = 1e-3
PROMPT = "The "


@dataclass(frozen=True)
class Sizes:
    images: int = 64        # per image model, drawn as an 8x8 grid
    ddpm_steps: int = 50    # of the 1000-step training schedule
    text_rows: int = 4
    text_tokens: int = 60   # new characters per row (prompt + new <= the GPT's context, 64)
    reps: int = 3           # timed rounds per path (median), after a warm-up


TINY = Sizes(images=4, ddpm_steps=4, text_rows=2, text_tokens=12, reps=1)  # for tests


def load(name: str):
    """(model in eval mode, fp32 on the CPU, checkpoint dict) from the committed weights."""
    path = HERE / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"genfast demo: no weights at {path}; run python -m genfast.demo.train")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    build = {"vae": models.VAE, "gan": models.Generator, "ddpm": models.UNet, "gpt": models.CharGPT}[name]
    model = build(**ckpt["config"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return model.eval(), ckpt


# ---- the four sampling loops (the same code for both paths) --------------------------

@torch.no_grad()
def sample_vae(vae: models.VAE, n: int, seed: int) -> torch.Tensor:
    return vae.decode(genfast.randn(n, vae.latent, seed=seed))


@torch.no_grad()
def sample_gan(gen, n: int, seed: int) -> torch.Tensor:
    nz = gen[0].in_channels
    return gen(genfast.randn(n, nz, 1, 1, seed=seed))


def ddpm_table(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (steps,), fp32 coefficient table (steps, NCOEF)): DDPM ancestral sampling on
    ``steps`` evenly spaced timesteps of the 1000-step schedule, as diffusers' DDPMScheduler
    with ``set_timesteps(steps)`` (fixed_small variance, no noise at t = 0)."""
    abar = models.ddpm_alphas_cumprod()
    train_steps = abar.numel()
    ts = torch.arange(0, train_steps, train_steps // steps)[:steps].flip(0)
    prev = ts - train_steps // steps
    abar_prev = torch.where(prev >= 0, abar[prev.clamp_min(0)], torch.ones((), dtype=torch.float64))
    table = genfast.diffusion.ddpm_coefficients(abar[ts], abar_prev, noisy=ts > 0)
    return ts, table.float()


@torch.no_grad()
def sample_ddpm(unet: models.UNet, n: int, steps: int, seed: int) -> torch.Tensor:
    ts, table = ddpm_table(steps)
    x = genfast.randn(n, 1, models.IMAGE, models.IMAGE, seed=seed)
    for i, t in enumerate(ts):
        eps = unet(x, t.expand(n))
        # one kernel: x0 from eps, clamped to [-1, 1] (diffusers' clip_sample), the posterior
        # mean and its noise, drawn at stream positions after those of the initial x
        x = genfast.diffusion.sampler_step(x, eps, table, i, stochastic=True, seed=seed, offset=x.numel(),
                                           clip=1.0)
    return x


@torch.no_grad()
def sample_ddpm_eager(unet: models.UNet, n: int, steps: int, seed: int) -> torch.Tensor:
    """sample_ddpm with diffusers' DDPMScheduler.step arithmetic in PyTorch ops; its noise is
    genfast.randn at the stream positions the fused step draws, so the samples must agree."""
    ts, _ = ddpm_table(steps)
    abar = models.ddpm_alphas_cumprod()
    stride = abar.numel() // steps
    x = genfast.randn(n, 1, models.IMAGE, models.IMAGE, seed=seed)
    numel = x.numel()
    for i, t in enumerate(ts.tolist()):
        eps = unet(x, torch.full((n,), t))
        a_t = abar[t].item()
        a_prev = abar[t - stride].item() if t - stride >= 0 else 1.0
        beta = 1.0 - a_t / a_prev
        x0 = ((x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1.0, 1.0)
        x = (a_prev ** 0.5 * beta / (1.0 - a_t)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)) * x
        if t > 0:
            std = max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20) ** 0.5
            x = x + std * genfast.randn(*x.shape, seed=seed, offset=numel + i * numel)
    return x


@torch.no_grad()
def sample_gpt(gpt: models.CharGPT, chars: str, rows: int, new_tokens: int, seed: int,
               prompt: str = PROMPT) -> torch.Tensor:
    """Tokens (rows, len(prompt) + new_tokens): the prompt, then characters at temperature 0.8, top-k 20."""
    if len(prompt) + new_tokens > gpt.context:
        raise ValueError(f"sample_gpt: prompt + new_tokens must fit the context ({gpt.context}), "
                         f"got {len(prompt)} + {new_tokens}")
    tokens = torch.tensor([[chars.index(c) for c in prompt]] * rows)
    out = torch.empty((rows, len(prompt) + new_tokens), dtype=torch.long)
    out[:, :len(prompt)] = tokens
    cache = gpt.new_cache(rows, len(prompt) + new_tokens)
    logits = gpt.step(tokens, 0, cache)  # prefill
    for i in range(new_tokens):
        # row r of step i draws stream position i * rows + r
        tok = genfast.sample_tokens(logits[:, -1], temperature=0.8, top_k=20, seed=seed, offset=i * rows)
        out[:, len(prompt) + i] = tok
        if i + 1 < new_tokens:
            logits = gpt.step(tok[:, None], len(prompt) + i, cache)
    return out


@torch.no_grad()
def sample_gpt_eager(gpt: models.CharGPT, chars: str, rows: int, new_tokens: int, seed: int,
                     prompt: str = PROMPT) -> torch.Tensor:
    """sample_gpt the gpt-fast way: a plain K/V cache written by slicing, SDPA, and top-k sampling
    with torch.topk + softmax + torch.multinomial (torch's generator: other characters)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[chars.index(c) for c in prompt]] * rows)
    out = torch.empty((rows, len(prompt) + new_tokens), dtype=torch.long)
    out[:, :len(prompt)] = tokens
    cache = gpt.new_eager_cache(rows, len(prompt) + new_tokens)
    logits = gpt.step_eager(tokens, 0, cache)
    for i in range(new_tokens):
        top, idx = torch.topk(logits[:, -1] / 0.8, 20)
        tok = idx.gather(1, torch.multinomial(top.softmax(-1), 1, generator=g))[:, 0]
        out[:, len(prompt) + i] = tok
        if i + 1 < new_tokens:
            logits = gpt.step_eager(tok[:, None], len(prompt) + i, cache)
    return out


# ---- output -------------------------------------------------------------------------

def png_bytes(gray: torch.Tensor) -> bytes:
    """An 8-bit grayscale PNG of a (height, width) uint8 tensor."""
    h, w = gray.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(gray[y].tolist()) for y in range(h))  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def image_grid(images: torch.Tensor, scale: int = 4, pad: int = 2) -> torch.Tensor:
    """(N, 1, 8, 8) in [-1, 1] -> uint8 (H, W): dark ink on white, each digit scaled up, in a grid."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = models.IMAGE * scale + pad
    grid = torch.full((rows * cell + pad, cols * cell + pad), 255, dtype=torch.uint8)
    ink = ((1 - images.clamp(-1, 1)) * 127.5).round().to(torch.uint8)  # -1 (background) -> white
    ink = ink[:, 0].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in range(n):
        y, x = pad + (i // cols) * cell, pad + (i % cols) * cell
        grid[y:y + cell - pad, x:x + cell - pad] = ink[i]
    return grid


# ---- the demo -------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    what: str
    agree: bool   # genfast's sample against the reference's (and the eager one's, for images)
    detail: str   # how close
    seconds: dict[str, float]  # "genfast", "reference", "eager": median time of one sampling run
    files: list[Path]


def _time(fns: dict, reps: int, round_s: float = 0.1) -> dict[str, float]:
    """Median seconds per call of each function. A round calls a function enough times to
    last about ``round_s`` (a sampling run of a few ms is otherwise timer and scheduler
    noise); rounds are interleaved so that a load change on a shared machine hits all."""
    calls = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, min(200, int(round_s / max(time.perf_counter() - t0, 1e-6))))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _reference(fn):
    def run():
        with genfast.use_backend("reference"):
            return fn()
    return run


def _image_result(name, what, fns, sizes, out_dir) -> Result:
    """fns: genfast, reference, eager sampling functions of the same images."""
    got = fns["genfast"]()
    errs = {k: (got - fns[k]()).abs().max().item() for k in ("reference", "eager")}  # also the warm-up
    path = out_dir / f"{name}.png"
    path.write_bytes(png_bytes(image_grid(got)))
    detail = f"max |diff| {errs['reference']:.1e} ref, {errs['eager']:.1e} eager (tol {IMAGE_ATOL:.0e})"
    return Result(name, what, max(errs.values()) <= IMAGE_ATOL, detail, _time(fns, sizes.reps), [path])


def run(out_dir: str | Path = "genfast-demo", seed: int = 0, sizes: Sizes = Sizes(),
        names=("vae", "gan", "ddpm", "gpt")) -> list[Result]:
    """Sample each model three ways, write genfast's samples into out_dir, return the results.

    genfast: default backend; reference: the same code under use_backend("reference");
    eager: the models and loops written in plain PyTorch (nn.GroupNorm + SiLU, the unpatched
    generator, diffusers' DDPM step arithmetic, SDPA over a plain cache), noise from genfast.randn.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    n = sizes.images
    if "vae" in names:
        vae, _ = load("vae")
        eager = models.to_eager(vae)
        fn = lambda: sample_vae(vae, n, seed)
        results.append(_image_result("vae", f"{n} prior samples: GroupNorm+SiLU", {
            "genfast": fn, "reference": _reference(fn), "eager": lambda: sample_vae(eager, n, seed)}, sizes, out_dir))
    if "gan" in names:
        gen, _ = load("gan")
        patched = copy.deepcopy(gen)
        report = genfast.patch(patched)
        if not report.replaced:  # then the comparison would measure nothing
            raise RuntimeError(f"genfast.patch fused nothing in the generator:\n{report}")
        results.append(_image_result("gan", f"{n} samples: patch, {len(report.replaced)} BatchNorm folded", {
            "genfast": lambda: sample_gan(patched, n, seed), "reference": _reference(lambda: sample_gan(gen, n, seed)),
            "eager": lambda: sample_gan(gen, n, seed)}, sizes, out_dir))
    if "ddpm" in names:
        unet, _ = load("ddpm")
        eager = models.to_eager(unet)
        steps = sizes.ddpm_steps
        fn = lambda: sample_ddpm(unet, n, steps, seed)
        results.append(_image_result("ddpm", f"{n} samples, {steps} steps: GN+SiLU, step", {
            "genfast": fn, "reference": _reference(fn),
            "eager": lambda: sample_ddpm_eager(eager, n, steps, seed)}, sizes, out_dir))
    if "gpt" in names:
        gpt, ckpt = load("gpt")
        chars = ckpt["chars"]
        rows, new = sizes.text_rows, sizes.text_tokens
        fns = {"genfast": lambda: sample_gpt(gpt, chars, rows, new, seed),
               "reference": _reference(lambda: sample_gpt(gpt, chars, rows, new, seed)),
               "eager": lambda: sample_gpt_eager(gpt, chars, rows, new, seed)}
        got, ref = fns["genfast"](), fns["reference"]()
        fns["eager"]()  # warm-up; its own random numbers, so other characters
        same = int((got == ref).sum())
        texts = ["".join(chars[i] for i in row) for row in got.tolist()]
        path = out_dir / "gpt.txt"
        path.write_text("\n\n----\n\n".join(texts) + "\n", encoding="utf-8")
        results.append(Result("gpt", f"{rows} x {new} chars: KVCache, sample_tokens", same == got.numel(),
                              f"{same}/{got.numel()} characters identical to ref (eager: timed only)",
                              _time(fns, sizes.reps), [path]))
    return results


def print_results(results: list[Result]) -> None:
    print(f"{'model':<5} {'what':<42} {'agree':<5} {'genfast ms':>10} {'ref ms':>8} {'eager ms':>8} "
          f"{'x ref':>6} {'x eager':>7}  closeness")
    for r in results:
        ms = {k: v * 1e3 for k, v in r.seconds.items()}
        print(f"{r.name:<5} {r.what:<42} {'yes' if r.agree else 'NO':<5} {ms['genfast']:>10.1f} "
              f"{ms['reference']:>8.1f} {ms['eager']:>8.1f} {ms['reference'] / ms['genfast']:>5.2f}x "
              f"{ms['eager'] / ms['genfast']:>6.2f}x  {r.detail}")
