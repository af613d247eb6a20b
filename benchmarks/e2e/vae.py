"""End to end, VAE: diffusers AutoencoderKL, encode → sample the posterior → decode.

- genfast: ``genfast.patch(vae)`` (GroupNorm+SiLU fused in the encoder's and
  decoder's ResnetBlock2Ds and output norms) and ``genfast.reparameterize``
  (z = mu + exp(logvar/2)·eps with eps drawn inside the kernel);
- eager: diffusers' own ``latent_dist.sample()`` arithmetic, mean + std·eps,
  with eps from ``genfast.randn`` at the same seed, so both draw the same noise
  and the images must agree within ``RTOL`` of their scale.

SD's VAE config at a reduced size on the CPU (printed).

Plus one training step of the same AutoencoderKL (train mode, Adam): encode,
sample the posterior, decode, loss = squared error + KL, backward, step.
genfast: the patched model (GroupNorm+SiLU forward and backward fused) and
``genfast.reparameterize_with_kl`` (z and the KL in one pass, forward and
backward); eager: diffusers' ``latent_dist.sample()`` arithmetic and
``latent_dist.kl()``, with the same noise. The first step's loss and
gradients, against the same step in fp64, may err at most twice as much as
eager's (``common.check_training``).

    python benchmarks/e2e/vae.py [--full] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import copy

import torch

import genfast

try:
    from . import common
except ImportError:  # run as a script
    import common

RTOL = 1e-4  # GroupNorm+SiLU rounding (~1e-6 relative) through a random-weight decoder

SD = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
      "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
      "up_block_types": ("UpDecoderBlock2D",) * 4}
QUICK = dict(SD, sample_size=128, block_out_channels=(32, 64, 64), norm_num_groups=16, layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY = dict(QUICK, sample_size=16, block_out_channels=(16, 16), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SEED = 1234


def build(config: dict, device, seed: int = 0):
    """(eager vae, patched copy)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).to(device).eval()
    patched = copy.deepcopy(vae)
    report = genfast.patch(patched)
    if not report.replaced:  # then the comparison below would measure nothing
        raise RuntimeError(f"genfast.patch fused nothing in the model:\n{report}")
    return vae, patched


@torch.no_grad()
def roundtrip_eager(vae, images):
    dist = vae.encode(images).latent_dist
    eps = genfast.randn(*dist.mean.shape, seed=SEED, device=images.device)
    return vae.decode(dist.mean + dist.std * eps).sample


@torch.no_grad()
def roundtrip_genfast(vae, images):
    dist = vae.encode(images).latent_dist
    return vae.decode(genfast.reparameterize(dist.mean, dist.logvar, seed=SEED)).sample


def loss_eager(vae, images):
    dist = vae.encode(images).latent_dist
    eps = genfast.randn(*dist.mean.shape, seed=SEED, device=images.device)
    recon = vae.decode(dist.mean + dist.std * eps).sample
    return (recon - images).square().sum() + dist.kl().sum()


def loss_genfast(vae, images):
    dist = vae.encode(images).latent_dist
    z, kl = genfast.reparameterize_with_kl(dist.mean, dist.logvar, seed=SEED)
    recon = vae.decode(z).sample
    return (recon - images).square().sum() + kl


class Trainer:
    """One training step of a VAE with its own Adam optimizer."""

    def __init__(self, vae, loss_fn):
        self.vae, self.loss_fn = vae, loss_fn
        self.opt = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def backward(self, images):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.vae, images)
        loss.backward()
        return loss.detach()

    def step(self, images):
        loss = self.backward(images)
        self.opt.step()
        return loss


def check_training(got: Trainer, ref: Trainer, exact: Trainer, images) -> tuple[float, float]:
    """The first step's loss and gradients, genfast's and eager's, against exact's (an fp64 model)."""
    def run(t, x):
        return [t.backward(x)], list(t.vae.parameters())

    return common.check_training("vae training", run(got, images), run(ref, images), run(exact, images.double()))


def check_close(got, ref, what: str) -> float:
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    if not err <= RTOL:
        raise AssertionError(f"{what}: genfast's images differ from eager's by {err:.2e} of their scale "
                             f"(tolerance {RTOL:.0e})")
    return err


def bench(quick: bool = True, device=None, batch: int = 2, reps: int = 3) -> list[common.Row]:
    device = torch.device(device) if device is not None else common.default_device()
    config = QUICK if quick else SD
    vae, patched = build(config, device)
    s = config["sample_size"]
    images = torch.rand(batch, 3, s, s, generator=torch.Generator("cpu").manual_seed(0)).to(device) * 2 - 1
    with common.full_fp32():
        err = check_close(roundtrip_genfast(patched, images), roundtrip_eager(vae, images), "vae")
    case = f"batch {batch}"
    t = common.time_many({"genfast": lambda: roundtrip_genfast(patched, images),
                          "eager": lambda: roundtrip_eager(vae, images)}, device, reps)
    rows = [common.Row("vae", case, "genfast", batch, "img/s", t["genfast"], note=f"max err {err:.1e} of scale"),
            common.Row("vae", case, "eager", batch, "img/s", t["eager"])]
    shown = {k: config[k] for k in ("sample_size", "block_out_channels", "layers_per_block")}
    common.print_rows(rows, f"vae: AutoencoderKL {'SD' if not quick else 'reduced'} {shown}, "
                            f"encode → reparameterize → decode, fp32; {device}")
    return rows + bench_training(config, device, batch, reps)


def bench_training(config: dict, device, batch: int, reps: int) -> list[common.Row]:
    model, patched = build(config, device)
    exact = Trainer(copy.deepcopy(model).double().train(), loss_eager)
    eager, fused = Trainer(model.train(), loss_eager), Trainer(patched.train(), loss_genfast)
    s = config["sample_size"]
    images = torch.rand(batch, 3, s, s, generator=torch.Generator("cpu").manual_seed(1)).to(device) * 2 - 1
    with common.full_fp32():
        err, err_ref = check_training(fused, eager, exact, images)
    case = f"train b{batch}"
    t = common.time_many({"genfast": lambda: fused.step(images), "eager": lambda: eager.step(images)}, device, reps)
    note = f"err vs fp64 {err:.1e} (eager {err_ref:.1e})"
    rows = [common.Row("vae", case, "genfast", batch, "img/s", t["genfast"], note=note),
            common.Row("vae", case, "eager", batch, "img/s", t["eager"])]
    common.print_rows(rows, f"vae: one training step of the same AutoencoderKL (squared error + KL, Adam), fp32; "
                            f"{device}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="SD's VAE at 512x512 (GPU)")
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    common.apply_common_args(a)
    bench(quick=not a.full, device=a.device, batch=a.batch)


if __name__ == "__main__":
    main()
