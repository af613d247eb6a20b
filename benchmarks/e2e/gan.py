"""End to end, GAN: sampling a DCGAN generator.

The generator is DCGAN's (Radford et al.): a latent (nz, 1, 1) through
ConvTranspose2d → BatchNorm2d → ReLU stages to a 64×64 Tanh image, built here
with random weights and random running statistics (so folding changes
numbers, as it would on a trained model).

- genfast: ``genfast.patch(generator)`` in eval mode: each BatchNorm2d right
  after a ConvTranspose2d is folded into the conv's weights, so a stage is the
  conv and a ReLU, run in channels_last on the CPU (the folded weights packed
  once for oneDNN, the ReLU as its post-op); the last ConvTranspose2d, to 3
  channels, and the Tanh after it run as one pass of genfast's kernel there;
- eager: the same module unpatched, and again with the module and the latent in
  channels_last (the layout alone).

Plus one training step of the generator and DCGAN's discriminator (Conv →
BatchNorm → LeakyReLU(0.2) stages; BCE on logits): the discriminator's loss
on a real and a fake batch and the generator's loss through the same
discriminator, both backward, then an Adam step of each.
genfast: both models patched, so every BatchNorm → activation pair runs as
one ``batch_norm_act`` in training mode (batch statistics, running statistics
updated), forward and backward; eager: the same models unpatched. The first
step's losses and gradients, against the same step in fp64, may err at most
twice as much as eager's (``common.check_training``).

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


def dcgan_discriminator(ndf: int = 64, nc: int = 3) -> nn.Sequential:
    """DCGAN's discriminator for 64x64 images, returning logits (the sigmoid goes into the loss)."""
    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]

    return nn.Sequential(nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True), *stage(ndf, ndf * 2),
                         *stage(ndf * 2, ndf * 4), *stage(ndf * 4, ndf * 8), nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
                         nn.Flatten())


def build_training(device, nz: int = 100, ngf: int = 64, ndf: int = 64, seed: int = 0):
    """((G, D) eager, (G, D) patched, (G, D) in fp64), training mode, with DCGAN's init."""
    torch.manual_seed(seed)
    models = (dcgan_generator(nz, ngf), dcgan_discriminator(ndf))
    for m in (mod for net in models for mod in net.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    models = tuple(net.to(device).train() for net in models)
    patched = copy.deepcopy(models)
    exact = tuple(copy.deepcopy(net).double() for net in models)
    for net in patched:
        if not genfast.patch(net).replaced:
            raise RuntimeError(f"genfast.patch fused nothing in the model:\n{net}")
    return models, patched, exact


class Trainer:
    """One DCGAN training step for a (G, D) pair with its own Adam optimizers."""

    def __init__(self, gen, disc):
        self.gen, self.disc = gen, disc
        self.opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def losses(self, real, z):
        """The step's two losses, backward done, optimizers not stepped."""
        bce = nn.functional.binary_cross_entropy_with_logits
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.gen(z)
        d_real, d_fake = self.disc(real), self.disc(fake.detach())
        loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        loss_d.backward()
        self.opt_g.zero_grad(set_to_none=True)
        d_gen = self.disc(fake)
        loss_g = bce(d_gen, torch.ones_like(d_gen))
        # only G's gradients are wanted here: D's were taken above, and D's optimizer steps first
        grads = torch.autograd.grad(loss_g, list(self.gen.parameters()))
        for p, g in zip(self.gen.parameters(), grads):
            p.grad = g
        return loss_d.detach(), loss_g.detach()

    def step(self, real, z):
        losses = self.losses(real, z)
        self.opt_d.step()
        self.opt_g.step()
        return losses


def check_training(got: Trainer, ref: Trainer, exact: Trainer, real, z) -> tuple[float, float]:
    """The first step's losses and gradients, genfast's and eager's, against exact's (fp64 models)."""
    def run(t, *inputs):
        return t.losses(*inputs), [*t.gen.parameters(), *t.disc.parameters()]

    return common.check_training("gan training", run(got, real, z), run(ref, real, z),
                                 run(exact, real.double(), z.double()))


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
    return rows + bench_training(device, batch, reps)


def bench_training(device, batch: int, reps: int) -> list[common.Row]:
    models, patched, exact = build_training(device)
    g = torch.Generator("cpu").manual_seed(1)
    real = (torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, 100, 1, 1, generator=g).to(device)
    eager, fused = Trainer(*models), Trainer(*patched)
    with common.full_fp32():
        err, err_ref = check_training(fused, eager, Trainer(*exact), real, z)
    case = f"train b{batch}"
    t = common.time_many({"genfast": lambda: fused.step(real, z), "eager": lambda: eager.step(real, z)}, device, reps)
    note = f"err vs fp64 {err:.1e} (eager {err_ref:.1e})"
    rows = [common.Row("gan", case, "genfast", batch, "img/s", t["genfast"], note=note),
            common.Row("gan", case, "eager", batch, "img/s", t["eager"])]
    common.print_rows(rows, f"gan: one training step of the DCGAN generator and discriminator (ngf = ndf = 64, "
                            f"64x64, Adam), fp32; {device}")
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
