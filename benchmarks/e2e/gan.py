"""End to end, GAN: sampling a DCGAN generator.

The generator is DCGAN's (Radford et al.): a latent (nz, 1, 1) through
ConvTranspose2d → BatchNorm2d → ReLU stages to a 64×64 Tanh image, built here
with random weights and random running statistics (so folding changes
numbers, as it would on a trained model).

- genfast: ``genfast.patch(generator)`` in eval mode: each BatchNorm2d right
  after a ConvTranspose2d is folded into the conv's weights, so a stage is the
  conv and a ReLU, run in channels_last on the CPU;
- eager: the same module unpatched, and again with the module and the latent in
  channels_last (the layout alone).

    python benchmarks/e2e/gan.py [--device cpu|cuda] [--batch N] [--threads N]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import genfast

try:
    from . import common
except ImportError:  # run as a script
    import common

# Folding (computed in fp64) rounds differently from conv-then-BN in fp32: a few ulps per
# stage, through five stages and a tanh.
ATOL = 1e-4


def dcgan_generator(nz: int = 100, ngf: int = 64, nc: int = 3) -> nn.Sequential:
    def stage(cin, cout, stride, padding):
        return [nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    return nn.Sequential(*stage(nz, ngf * 8, 1, 0), *stage(ngf * 8, ngf * 4, 2, 1), *stage(ngf * 4, ngf * 2, 2, 1),
                         *stage(ngf * 2, ngf, 2, 1), nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())


def build(device, nz: int = 100, ngf: int = 64, seed: int = 0):
    """(eager generator, patched copy), eval mode."""
    torch.manual_seed(seed)
    gen = dcgan_generator(nz, ngf)
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)  # DCGAN's init
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.01, 0.1)  # ~ the small variances of 0.02-init convs
    gen = gen.to(device).eval()
    patched = copy.deepcopy(gen)
    report = genfast.patch(patched)
    if not report.replaced:  # then the comparison below would measure nothing
        raise RuntimeError(f"genfast.patch fused nothing in the model:\n{report}")
    return gen, patched


@torch.no_grad()
def sample(gen, z):
    return gen(z)


def check_close(got, ref, what: str) -> float:
    err = (got - ref).abs().max().item()
    if not err <= ATOL:
        raise AssertionError(f"{what}: genfast's images differ from eager's by {err:.2e} (tolerance {ATOL:.0e})")
    return err


def bench(quick: bool = True, device=None, batch: int = 64, reps: int = 5) -> list[common.Row]:
    device = torch.device(device) if device is not None else common.default_device()
    if not quick:
        batch = 256
    gen, patched = build(device)
    z = torch.randn(batch, 100, 1, 1, generator=torch.Generator("cpu").manual_seed(0)).to(device)
    with common.full_fp32():
        err = check_close(sample(patched, z), sample(gen, z), "gan")
    case = f"batch {batch}"
    # eager again with the model and the latent in channels_last, the layout the patched
    # model's folded convs run in on the CPU: how much of the gain is the layout alone
    gen_cl = copy.deepcopy(gen).to(memory_format=torch.channels_last)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    t = common.time_many({"genfast": lambda: sample(patched, z), "eager": lambda: sample(gen, z),
                          "eager channels_last": lambda: sample(gen_cl, z_cl)}, device, reps)
    rows = [common.Row("gan", case, "genfast", batch, "img/s", t["genfast"], note=f"max err {err:.1e}"),
            common.Row("gan", case, "eager", batch, "img/s", t["eager"]),
            common.Row("gan", case, "eager channels_last", batch, "img/s", t["eager channels_last"])]
    common.print_rows(rows, f"gan: DCGAN generator (nz 100, ngf 64, 64x64), eval, fp32; {device}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="batch 256")
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    common.apply_common_args(a)
    bench(quick=not a.full, device=a.device, batch=a.batch)


if __name__ == "__main__":
    main()
